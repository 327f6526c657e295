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
    let input = dir.join("log");
    std::fs::write(&input, log.join("\n")).unwrap();
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/fio_report.py"))
        .arg(&input)
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
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
