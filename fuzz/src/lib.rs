//! Shared by the fuzz targets: a scratch directory per process.

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn scratch() -> &'static std::path::Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ublk-ploop-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a scratch directory");
        d
    })
}
