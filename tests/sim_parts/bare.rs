//! Seeds with 4 KiB clusters run on a bare stack: ploop's descriptor
//! allows clusters of 32 KiB and more only, but small clusters are what
//! make growth past the table's slack (data clusters moved for the BAT)
//! cheap enough to simulate. Here the driver keeps the chain (the
//! descriptor's part): snapshot, merge of the top, grow and compact run
//! through the stack as `disk::ops` would run them; delete and switch need
//! a descriptor and are skipped.

use std::path::{Path, PathBuf};

use super::disk::{JobDone, JobKind};
use super::{errinfo, Driver, DISK_FULL, DIR};
use ublk_ploop::io::{Direct, Io};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{LayerSpec, Stack, StackOptions};

/// Clusters a bare merge copies at once (as `disk::ops`).
const MERGE_BATCH: usize = 8;

impl Driver {
    fn new_layer_path(&mut self) -> PathBuf {
        let p = Path::new(DIR).join(format!("delta{}.img", self.next_layer));
        self.next_layer += 1;
        p
    }

    /// The base image, created and opened with its entry durable.
    pub fn bare_setup(&mut self) -> Result<(), String> {
        self.io.create_dir_all(Path::new(DIR)).map_err(|e| format!("setup: creating {DIR}: {e}"))?;
        let base = self.new_layer_path();
        let (io, path, size, cluster) = (self.io.clone(), base.clone(), self.cfg.size, self.cfg.cluster);
        self.block_on("create", async move {
            PloopLayer::create(&io, &path, size, cluster).await?;
            io.sync_dir(Path::new(DIR)).await.map_err(|e| ublk_ploop::Error::io(e, DIR))?;
            io.sync_dir(Path::new(DIR).parent().unwrap()).await.map_err(|e| ublk_ploop::Error::io(e, "/sim"))
        })?
        .map_err(|e| format!("setup: creating {}: {e}", base.display()))?;
        self.bare_open(&[base]).map_err(|e| format!("setup: {e}"))
    }

    pub fn bare_open(&mut self, paths: &[PathBuf]) -> Result<(), String> {
        let specs: Vec<LayerSpec> = paths.iter().map(LayerSpec::ploop).collect();
        let io = self.io.clone();
        let opts = StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None };
        let (stack, _) = self
            .block_on("open", async move { Stack::open_layers(&io, &specs, &opts).await })?
            .map_err(|e| format!("opening {paths:?}: {e}"))?;
        self.block = stack.block_size() as u64;
        self.paths = paths.to_vec();
        self.served = self.paths.clone();
        self.stack = Some(std::rc::Rc::new(stack));
        self.opened_ops = self.sim.ops_completed();
        self.figures.reopens += 1;
        self.backup_reopened()
    }

    /// A snapshot as `ops::snapshot` makes one, minus the descriptor: the
    /// new delta's entry is made durable before the swap.
    pub fn bare_snapshot(&mut self) {
        let path = self.new_layer_path();
        self.watch.model().snapshot_begin();
        let p = path.clone();
        self.start_job(JobKind::Snapshot { quiet: false }, format!("snapshot onto {}", path.display()), None, None, move |io, stack, disk| async move {
            let r = async {
                let top = stack.prepare_top(&io, &p).await?;
                if let Err(e) = io.sync_dir(Path::new(DIR)).await {
                    ublk_ploop::stack::discard_top(&io, top).await;
                    return Err(ublk_ploop::Error::io(e, DIR));
                }
                stack.install_top(&io, top).await.map(|_| JobDone::Other)
            }
            .await;
            (disk, r.map_err(errinfo))
        });
        self.job.as_mut().unwrap().new_top = Some(path);
    }

    /// The top's parent merged into the top, the parent then dropped from
    /// the stack; its file goes once the driver's chain no longer names it.
    pub fn bare_merge(&mut self) {
        if self.paths.len() < 2 {
            return;
        }
        self.watch.model().merge_moves_holdings();
        self.start_job(JobKind::Merge, "merge of the top".into(), None, None, move |io, stack, disk| async move {
            let r = async {
                stack.merge_parent_into_top(&io, MERGE_BATCH, &|_, _| {}).await?;
                let parent = stack.layers_now().await.len() - 2;
                stack.remove_layer(parent).await.map(|_| JobDone::Other)
            }
            .await;
            (disk, r.map_err(errinfo))
        });
    }

    /// Files of layers the chain dropped (a finished bare merge).
    pub fn bare_remove_dropped(&mut self, before: &[PathBuf]) -> Result<(), String> {
        for p in before.iter().filter(|p| !self.paths.contains(p)) {
            self.io.remove_file(p).map_err(|e| format!("step {}: removing {}: {e}", self.step, p.display()))?;
        }
        Ok(())
    }

    /// The chain the driver kept, or with a snapshot's delta caught in
    /// flight (if it survived whole enough to open: after the swap it may
    /// hold acknowledged writes).
    pub fn bare_recover(&mut self, new_top: Option<PathBuf>, repair: bool, crashed: bool) -> Result<(), String> {
        let mut candidates = vec![self.paths.clone()];
        if let Some(top) = &new_top {
            let mut with = self.paths.clone();
            with.push(top.clone());
            candidates.insert(0, with);
            self.watch.model().unsure_holdings();
        }
        let mut last_err = String::new();
        for paths in candidates {
            if paths.len() > self.paths.len() && self.sim.read_file(paths.last().unwrap()).is_none() {
                continue;
            }
            self.check_deltas(&paths, repair, crashed, new_top.as_deref())?;
            match self.bare_open(&paths) {
                Ok(()) => {
                    if new_top.is_some() && paths.last() == new_top.as_ref() {
                        // Now a member for good: its entry is made durable,
                        // as the descriptor's store would have.
                        let io = self.io.clone();
                        self.block_on("sync-dir", async move { io.sync_dir(Path::new(DIR)).await })?
                            .map_err(|e| format!("step {}: syncing {DIR} with faults off: {e}", self.step))?;
                    }
                    return Ok(());
                }
                Err(e) => last_err = e,
            }
        }
        if last_err.contains("(os error 28)") {
            // The filesystem is full (a tight capacity): the recovery owes
            // this error and the run cannot go on.
            return Err(format!("{DISK_FULL}: {last_err}"));
        }
        Err(format!("invariant 2 (deltas open): step {}: reopen after a {} failed: {last_err}", self.step, if crashed { "crash" } else { "clean close" }))
    }
}
