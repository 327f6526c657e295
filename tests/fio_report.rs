//! The fio suite's report (benches/fio_report.py): ratios come from runs of
//! the same cell, targets are judged on the median, and a miss is printed.

mod common;

use common::TempDir;

fn row(run: u32, device: &str, workload: &str, iops: f64) -> String {
    format!(
        "FIO-ROW {{\"run\": {run}, \"state\": \"allocated\", \"queues\": 1, \"device\": \"{device}\", \"workload\": \"{workload}\", \"iops\": {iops}, \"bw\": {}, \"p99_us\": 100.0}}",
        iops * 4096.0
    )
}

/// Run the report on these log lines, writing into `dir`; its stdout.
fn report(dir: &TempDir, log: &[String]) -> String {
    let input = dir.join("log");
    std::fs::write(&input, log.join("\n")).unwrap();
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/fio_report.py"))
        .arg(&input)
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn the_report_takes_medians_of_per_run_ratios_and_names_misses() {
    let dir = TempDir::new("fio-report");
    let mut log = vec!["[   1.0] noise".to_string(), "FIO-META {\"kernel\": \"7.3\", \"data_path\": \"zero_copy\", \"size_mb\": 64, \"secs\": 1, \"runs\": 3}".into()];
    // 4k: ublk at 1.2, 0.8, 1.1 of loop-dio -> median 1.1, meets >= 1.0.
    for (run, u, l) in [(1, 1200.0, 1000.0), (2, 800.0, 1000.0), (3, 1100.0, 1000.0)] {
        log.push(row(run, "ublk", "randread-4k-qd32", u));
        log.push(row(run, "loop-dio", "randread-4k-qd32", l));
        log.push(row(run, "loop-buf", "randread-4k-qd32", 2000.0));
    }
    // 1M: 0.85 of loop-dio in every run: misses >= 0.9.
    for run in 1..=3 {
        log.push(row(run, "ublk", "read-1m-qd4", 85.0));
        log.push(row(run, "loop-dio", "read-1m-qd4", 100.0));
    }
    log.push("FIO-CACHE {\"device\": \"loop-buf\", \"working_set\": 33554432, \"file_cached\": 33554432, \"device_cached\": 0}".into());
    let text = report(&dir, &log);
    assert!(text.contains("MISS allocated q1 read-1m-qd4: 0.85 < 0.9"), "{text}");
    assert!(text.contains("targets: 1 met, 1 missed"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let cell = json["summary"].as_array().unwrap().iter().find(|e| e["workload"] == "randread-4k-qd32").unwrap();
    let r = &cell["vs_loop-dio"];
    assert_eq!((r["median"].as_f64(), r["min"].as_f64(), r["max"].as_f64()), (Some(1.1), Some(0.8), Some(1.2)));
    assert_eq!(cell["meets_target"], true);
    assert!((cell["vs_loop-buf"]["median"].as_f64().unwrap() - 0.55).abs() < 1e-9);
    for svg in ["ratios.svg", "page-cache.svg"] {
        let body = std::fs::read_to_string(dir.join(svg)).unwrap();
        assert!(body.starts_with("<svg") && body.trim_end().ends_with("</svg>"), "{svg}");
    }
    assert!(std::fs::read_to_string(dir.join("table.md")).unwrap().contains("| loop (buffered) | 32.0 MiB |"));
}

/// A row with a state and the server's CPU per I/O.
fn server_row(run: u32, state: &str, device: &str, workload: &str, iops: f64, cpu_us: f64) -> String {
    format!(
        "FIO-ROW {{\"run\": {run}, \"state\": \"{state}\", \"queues\": 1, \"device\": \"{device}\", \"workload\": \"{workload}\", \"iops\": {iops}, \"bw\": {}, \"p99_us\": 250, \"cpu_us\": {cpu_us}}}",
        iops * 4096.0
    )
}

#[test]
fn the_report_compares_with_the_peer_of_each_state_and_judges_in_place_writes_against_rublk() {
    let dir = TempDir::new("fio-report-peers");
    let mut log = vec!["FIO-META {\"kernel\": \"7.3\", \"data_path\": \"zero_copy\", \"size_mb\": 64, \"secs\": 1, \"runs\": 2}".to_string()];
    for run in 1..=2 {
        // In-place writes: 0.9 of rublk misses the 0.95 target.
        log.push(server_row(run, "allocated", "ublk", "randwrite-4k-qd32", 900.0, 80.0));
        log.push(server_row(run, "allocated", "rublk", "randwrite-4k-qd32", 1000.0, 110.0));
        log.push(server_row(run, "allocated", "loop-dio", "randwrite-4k-qd32", 900.0, 0.0).replace("\"cpu_us\": 0", "\"cpu_us\": null"));
        // The stack's peer is qemu-nbd, with no target of its own.
        log.push(server_row(run, "stack", "ublk", "randwrite-4k-qd1", 800.0, 400.0));
        log.push(server_row(run, "stack", "qemu-nbd", "randwrite-4k-qd1", 400.0, 1700.0));
        // An A/B of two builds.
        log.push(server_row(run, "stack", "ublk-alt", "randwrite-4k-qd1", 640.0, 500.0));
    }
    let text = report(&dir, &log);
    assert!(text.contains("MISS allocated q1 randwrite-4k-qd32: 0.90 < 0.95 rublk"), "{text}");
    assert!(text.contains("peer targets: 0 met, 1 missed"), "{text}");
    assert!(text.contains("stack q1 randwrite-4k-qd1: 1.25  cpu 400 / 500"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let cells = json["summary"].as_array().unwrap();
    let flat = cells.iter().find(|e| e["state"] == "allocated").unwrap();
    assert_eq!(flat["peer"], "rublk");
    assert_eq!(flat["meets_peer_target"], false);
    assert_eq!(flat["ublk"]["cpu_us"].as_f64(), Some(80.0));
    assert!(flat["loop-dio"]["cpu_us"].is_null(), "loop has no server to time: {flat}");
    let stack = cells.iter().find(|e| e["state"] == "stack").unwrap();
    assert_eq!(stack["peer"], "qemu-nbd");
    assert_eq!(stack["vs_qemu-nbd"]["median"].as_f64(), Some(2.0));
    assert!(stack.get("peer_target").is_none(), "{stack}");
    let table = std::fs::read_to_string(dir.join("table.md")).unwrap();
    assert!(table.contains("| 0.4k qemu-nbd |") && table.contains("| 250 / 250 / - |") && table.contains("| 400 / 1700 |"), "{table}");
}
