//! The systemd unit and its config: the unit passes `systemd-analyze
//! verify`, and the example config is one `ublk-ploop serve` accepts.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TempDir;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn unit_file_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(repo().join("systemd/ublk-ploop@.service")).unwrap();
    assert!(unit.contains("Type=notify"), "the unit must wait for READY=1");
    assert!(unit.contains("serve --config /etc/ublk-ploop/%i.toml"));
    // Point ExecStart at the binary under test; verify an instance.
    let dir = TempDir::new("systemd-unit");
    let unit = unit.replace("/usr/local/bin/ublk-ploop", env!("CARGO_BIN_EXE_ublk-ploop"));
    let path = dir.join("ublk-ploop@ct1.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Only complaints about our unit count (the host's own units may warn).
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("ublk-ploop@")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {ours:?}");
}

#[test]
fn example_config_is_accepted_by_serve() {
    let dir = TempDir::new("systemd-cfg");
    let img = dir.join("root.hdd");
    let st = Command::new(env!("CARGO_BIN_EXE_ublk-ploop"))
        .args(["init", img.to_str().unwrap(), "--size", "16M"])
        .status()
        .unwrap();
    assert!(st.success());
    let example = std::fs::read_to_string(repo().join("systemd/example.toml")).unwrap();
    let config = example.replace("/var/lib/containers/101/root.hdd", img.to_str().unwrap());
    let cfg = dir.join("ct.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ublk-ploop")).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("this host has ublk; serve not exercised here (the VM tests do)");
    } else {
        // The config parsed; the only thing missing is the kernel driver.
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("/dev/ublk-control is missing"), "{err}");
        assert!(err.contains("modprobe ublk_drv"), "{err}");
    }
    // A config with a typo is refused by name.
    std::fs::write(&cfg, "imgae = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ublk-ploop")).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    // A scheduler value that could not be a name is refused before any device exists.
    std::fs::write(&cfg, format!("disk = \"{}\"\nio_scheduler = \"none; rm\"\n", img.display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ublk-ploop")).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("io_scheduler") && err.contains("not a scheduler name"), "{err}");
}
