//! A backup's record of changes (changed-block tracking): which one a
//! backup uses, and when a new one becomes the record the next incremental
//! backup trusts.
//!
//! A new record is attached before the full backup's copy starts (so no
//! change is missed), but it is published (kept in the image across clean
//! stops, and handed to later backups) only once that backup succeeded: a
//! record born of a failed attempt covers only the changes since that
//! attempt, and an incremental over an older backup would miss the rest.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::stack::Stack;
use crate::tracker::Tracker;

/// The record a running backup uses.
pub struct BackupRecord {
    tracker: Arc<Tracker>,
    /// Created for this backup (no record existed): published on success,
    /// detached on failure.
    fresh: bool,
}

impl BackupRecord {
    /// The record for a backup, given the current one. An incremental
    /// backup without one is refused: the stream would hold only allocated
    /// clusters, and one that became zero since the older backup would
    /// keep its old bytes there.
    pub async fn start(stack: &Stack, current: Option<&Arc<Tracker>>, incremental: bool) -> Result<BackupRecord> {
        match (current, incremental) {
            (Some(t), _) => Ok(BackupRecord { tracker: t.clone(), fresh: false }),
            (None, true) => Err(Error::new(
                libc::ENOENT,
                "no record of changes since a previous backup (none was taken, the last full one failed, the disk grew, or the device stopped uncleanly): \
                 take a full backup into a new destination",
            )),
            (None, false) => {
                let t = Arc::new(Tracker::new(stack.size(), stack.cluster_size()));
                stack.add_tracker(t.clone()).await?;
                Ok(BackupRecord { tracker: t, fresh: true })
            }
        }
    }

    /// The tracker the copy reads and resets (`SendOptions::cbt`).
    pub fn tracker(&self) -> Arc<Tracker> {
        self.tracker.clone()
    }

    /// After the backup (or when it could not start): a new record becomes
    /// `record` and is kept in the image (as `id`) only if the backup
    /// succeeded; else it is detached. An existing record is left as the
    /// copy left it (a failed copy gave its marks back).
    pub async fn finish(self, stack: &Stack, ok: bool, record: &Mutex<Option<Arc<Tracker>>>, id: [u8; 16]) {
        if !self.fresh {
            return;
        }
        if ok {
            stack.keep_on_close(Some((self.tracker.clone(), id)));
            *record.lock().unwrap() = Some(self.tracker);
        } else {
            stack.remove_tracker(&self.tracker).await;
        }
    }
}
