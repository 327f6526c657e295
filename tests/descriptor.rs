//! DiskDescriptor.xml against ploop's reader rules: what we write passes a
//! checker written from the rules (not from our writer), hand-written
//! ploop-style descriptors open right, and malformed ones are refused with
//! the element named.

mod common;

use std::fs;
use std::path::Path;

use common::{ploop, TempDir};
use ublk_ploop::disk::{Descriptor, Disk, Guid, NONE_GUID, TOP_GUID};
use ublk_ploop::io::{block_on, SyncIo};
use ublk_ploop::layers::PloopLayer;

/// ploop's reader rules and writer layout, checked on the raw XML.
fn check_ploop_rules(xml: &str) {
    let doc = roxmltree::Document::parse(xml).expect("well-formed XML");
    assert!(xml.starts_with("<?xml version=\"1.0\"?>\n"), "XML declaration as libxml2 writes it");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "Virtuozzo_disk_image");
    let elems = |n: roxmltree::Node| n.children().filter(|c| c.is_element()).map(|c| c.tag_name().name().to_string()).collect::<Vec<_>>();
    assert_eq!(elems(root), ["Disk_Parameters", "StorageData", "Snapshots"], "top-level order");
    let params = root.children().find(|c| c.has_tag_name("Disk_Parameters")).unwrap();
    let pe = elems(params);
    let want: Vec<&str> = ["Disk_size", "Cylinders", "Heads", "Sectors", "Padding"].into();
    assert_eq!(pe.iter().filter(|e| *e != "Max_delta_size" && *e != "Encryption").collect::<Vec<_>>(), want, "Disk_Parameters order");
    let num = |n: roxmltree::Node, name: &str| -> u64 {
        n.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).unwrap_or_else(|| panic!("<{name}> missing")).parse().unwrap()
    };
    let size = num(params, "Disk_size");
    let (cyl, heads, sectors) = (num(params, "Cylinders"), num(params, "Heads"), num(params, "Sectors"));
    assert_eq!(sectors, size / (cyl * heads), "Sectors = size / (cylinders * heads)");
    assert_eq!(num(params, "Padding"), 0);
    let sd = root.children().find(|c| c.has_tag_name("StorageData")).unwrap();
    let storages: Vec<_> = sd.children().filter(|c| c.has_tag_name("Storage")).collect();
    assert_eq!(storages.len(), 1, "exactly one Storage");
    let st = storages[0];
    let se = elems(st);
    assert_eq!(&se[..3], ["Start", "End", "Blocksize"], "Storage order");
    assert_eq!(num(st, "Start"), 0);
    assert_eq!(num(st, "End"), size, "End = disk size in sectors");
    let bs = num(st, "Blocksize");
    assert!(bs.is_power_of_two() && (64..=131072).contains(&bs), "Blocksize {bs}");
    let guid_ok = |s: &str| s.len() == 38 && s.starts_with('{') && s.ends_with('}') && s == s.to_lowercase() && s.parse::<Guid>().is_ok();
    let mut image_guids = vec![];
    let mut types = vec![];
    for img in st.children().filter(|c| c.has_tag_name("Image")) {
        assert_eq!(elems(img), ["GUID", "Type", "File"], "Image order");
        let text = |name: &str| img.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).unwrap().to_string();
        assert!(guid_ok(&text("GUID")), "Image GUID {}", text("GUID"));
        types.push(text("Type"));
        assert!(!Path::new(&text("File")).is_absolute(), "File written relative to the descriptor: {}", text("File"));
        image_guids.push(text("GUID"));
    }
    assert!(!image_guids.is_empty());
    assert!(types.iter().all(|t| t == &types[0]) && (types[0] == "Compressed" || types[0] == "Plain"), "{types:?}");
    let snaps = root.children().find(|c| c.has_tag_name("Snapshots")).unwrap();
    let top = snaps.children().find(|c| c.has_tag_name("TopGUID")).and_then(|c| c.text()).unwrap().to_string();
    assert_eq!(top, TOP_GUID.to_string(), "TopGUID is ploop's fixed top GUID");
    let mut shot_guids = vec![];
    for shot in snaps.children().filter(|c| c.has_tag_name("Shot")) {
        let e = elems(shot);
        assert_eq!(&e[..2], ["GUID", "ParentGUID"], "Shot order");
        let text = |name: &str| shot.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).unwrap().to_string();
        assert!(guid_ok(&text("GUID")) && guid_ok(&text("ParentGUID")));
        shot_guids.push((text("GUID"), text("ParentGUID")));
    }
    assert_eq!(shot_guids.len(), image_guids.len(), "one Shot per Image");
    // The chain from TopGUID reaches NONE.
    let mut at = top;
    let mut steps = 0;
    while at != NONE_GUID.to_string() {
        at = shot_guids.iter().find(|(g, _)| *g == at).unwrap_or_else(|| panic!("{at} has no Shot")).1.clone();
        steps += 1;
        assert!(steps <= shot_guids.len(), "the chain loops");
    }
}

#[test]
fn init_writes_ploop_layout_and_snapshots_keep_it() {
    let dir = TempDir::new("desc-init");
    let d = dir.join("ct");
    let out = ploop(["init", d.to_str().unwrap(), "--size", "1G", "--json"]).ok().json();
    assert_eq!(out["top"], TOP_GUID.to_string());
    let xml = fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    check_ploop_rules(&xml);
    assert!(xml.contains("<Disk_size>2097152</Disk_size>") && xml.contains("<Blocksize>2048</Blocksize>"), "{xml}");
    assert!(xml.contains("<File>root.hds</File>"), "{xml}");
    assert!(d.join("root.hds").exists());
    // Offline snapshots: names as ploop gives them, rules still hold.
    let g1 = ploop(["snapshot", d.to_str().unwrap()]).ok().stdout.trim().to_string();
    let g2 = ploop(["snapshot", d.to_str().unwrap(), "--uuid", "{aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee}"]).ok().stdout.trim().to_string();
    assert_eq!(g2, "{aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee}");
    let xml = fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    check_ploop_rules(&xml);
    let disk = Disk::load(&d).unwrap();
    assert_eq!(disk.desc.image(g1.parse().unwrap()).unwrap().file, "root.hds", "the first snapshot names the base delta");
    let top_file = &disk.desc.image(TOP_GUID).unwrap().file;
    assert!(top_file.starts_with("root.hds.{") && top_file.ends_with('}') && top_file.len() == "root.hds.".len() + 38, "{top_file}");
    let list = ploop(["snapshot-list", d.to_str().unwrap()]).ok().stdout.clone();
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("PARENT_UUID") && lines.len() == 4, "{list}");
    assert!(lines.iter().any(|l| l.contains(&format!("* {TOP_GUID}"))), "the top is marked: {list}");
    let json = ploop(["snapshot-list", d.to_str().unwrap(), "--json"]).ok().json();
    assert_eq!(json.as_array().unwrap().len(), 3);
    // Cluster sizes ploop cannot describe are refused.
    ploop(["init", dir.join("small").to_str().unwrap(), "--size", "1G", "--cluster-size", "4K"])
        .expect_clean_failure()
        .mentions(&["power of two between 32K and 64M"]);
}

/// The spec's example descriptor, plus what ploop's reader tolerates.
fn example(files: [&str; 3], extra: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<Virtuozzo_disk_image>
  <Disk_Parameters>
    <Disk_size>0x{size:x}</Disk_size>
    <Cylinders>40960</Cylinders>
    <Heads>16</Heads>
    <Sectors>32</Sectors>
    <Padding>0</Padding>
    <Vendor_extension>ignored</Vendor_extension>
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>20971520</End>
      <Blocksize>2048</Blocksize>
      <Image>
        <GUID>{{7C2A9D41-1E5F-4A63-8B2D-6E0F9A8B7C65}}</GUID>
        <Type>Compressed</Type>
        <File>{f1}</File>
      </Image>
      <Image>
        <GUID>{{0f1e6b3a-6c0d-4b7e-9a51-3d2c1b0a9f88}}</GUID>
        <Type>Compressed</Type>
        <File>{f0}</File>
      </Image>
      <Image>
        <GUID>{{5fbaabe3-6958-40ff-92a7-860e329aab41}}</GUID>
        <Type>Compressed</Type>
        <File>{f2}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{{5fbaabe3-6958-40ff-92a7-860e329aab41}}</TopGUID>
    <Shot>
      <GUID>{{0f1e6b3a-6c0d-4b7e-9a51-3d2c1b0a9f88}}</GUID>
      <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID>
    </Shot>
    <Shot>
      <GUID>{{7c2a9d41-1e5f-4a63-8b2d-6e0f9a8b7c65}}</GUID>
      <ParentGUID>{{0f1e6b3a-6c0d-4b7e-9a51-3d2c1b0a9f88}}</ParentGUID>
      {extra}
    </Shot>
    <Shot>
      <GUID>{{5fbaabe3-6958-40ff-92a7-860e329aab41}}</GUID>
      <ParentGUID>{{7c2a9d41-1e5f-4a63-8b2d-6e0f9a8b7c65}}</ParentGUID>
    </Shot>
  </Snapshots>
</Virtuozzo_disk_image>
"#,
        size = 20971520u64,
        f0 = files[0],
        f1 = files[1],
        f2 = files[2]
    )
}

#[test]
fn ploop_style_descriptors_open_right() {
    let dir = TempDir::new("desc-ploop");
    let d = dir.join("disk");
    fs::create_dir_all(d.join("sub")).unwrap();
    let shared = dir.join("shared");
    fs::create_dir_all(&shared).unwrap();
    // Base in a sibling directory (`../`), middle in a subdirectory.
    let files = ["../shared/root.hds", "sub/root.hds.{c4d3e2f1-a0b9-4c8d-9e7f-6a5b4c3d2e1f}", "root.hds.{1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d}"];
    for f in files {
        block_on(PloopLayer::create(&SyncIo, &d.join(f), 10 << 30, 1 << 20)).unwrap();
    }
    for extra in ["", "<Temporary/>"] {
        fs::write(d.join("DiskDescriptor.xml"), example(files, extra)).unwrap();
        let disk = Disk::load(&d).unwrap();
        assert_eq!(disk.desc.size(), 10 << 30, "hex Disk_size read as strtoul does");
        let chain: Vec<_> = disk.layers(None).unwrap().into_iter().map(|s| fs::canonicalize(s.path).unwrap()).collect();
        let want: Vec<_> = files.iter().map(|f| fs::canonicalize(d.join(f)).unwrap()).collect();
        assert_eq!(chain, want, "the chain follows ParentGUID, not the order of the images");
        // Through the CLI too.
        let info = ploop(["info", d.to_str().unwrap(), "--json"]).ok().json();
        assert_eq!(info["images"].as_array().unwrap().len(), 3);
        assert_eq!(info["size"], 10u64 << 30);
        ploop(["check", d.to_str().unwrap()]).ok();
    }
    // A temporary snapshot is listed as such.
    let list = ploop(["snapshot-list", d.to_str().unwrap(), "--json"]).ok().json();
    assert!(list.as_array().unwrap().iter().any(|r| r["temporary"] == true), "{list}");
    // The first snapshot may be given by the descriptor file as well.
    Disk::load(&d.join("DiskDescriptor.xml")).unwrap();
}

#[test]
fn malformed_descriptors_are_refused_with_the_element_named() {
    let files = ["a", "b", "c"];
    let good = example(files, "");
    let cases: Vec<(String, &str)> = vec![
        (good.replace("<Disk_Parameters>", "<Disk_Parametrs>").replace("</Disk_Parameters>", "</Disk_Parametrs>"), "Disk_Parameters"),
        (good.replace("</Storage>\n  </StorageData>", "</Storage>\n    <Storage></Storage>\n  </StorageData>"), "Storage"),
        (good.replace("<Blocksize>2048</Blocksize>", "<Blocksize>3000</Blocksize>"), "Blocksize"),
        (good.replace("<Blocksize>2048</Blocksize>", "<Blocksize>32</Blocksize>"), "Blocksize"),
        (good.replace("<Blocksize>2048</Blocksize>", "<Blocksize>two</Blocksize>"), "Blocksize"),
        (good.replace("<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>", ""), "TopGUID"),
        (good.replace("<TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>", "<TopGUID>{7c2a9d41-1e5f-4a63-8b2d-6e0f9a8b7c65}</TopGUID>").replace("      \n", "      <Temporary/>\n"), "TopGUID"),
        (good.replacen("<File>a</File>", "", 1), "File"),
        (good.replacen("<GUID>{0f1e6b3a-6c0d-4b7e-9a51-3d2c1b0a9f88}</GUID>", "<GUID>0f1e6b3a</GUID>", 1), "GUID"),
        (good.replacen("<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>", "", 1), "ParentGUID"),
        (good.replace("<Type>Compressed</Type>\n        <File>c</File>", "<Type>Plain</Type>\n        <File>c</File>"), "Type"),
        (good.replace("<Type>Compressed</Type>\n        <File>c</File>", "<Type>Zipped</Type>\n        <File>c</File>"), "Type"),
        // One Shot too few.
        (good.replacen("    <Shot>\n      <GUID>{0f1e6b3a-6c0d-4b7e-9a51-3d2c1b0a9f88}</GUID>\n      <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>\n    </Shot>\n", "", 1), "Shot"),
        // A loop in the chain.
        (good.replacen("<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>", "<ParentGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</ParentGUID>", 1), "loops"),
        ("<not xml".to_string(), "well-formed"),
        // One file named twice, however spelled.
        (good.replace("<File>c</File>", "<File>a</File>"), "both name the file"),
        (good.replace("<File>c</File>", "<File>./a</File>"), "both name the file"),
    ];
    for (xml, needle) in cases {
        let err = Descriptor::parse(&xml).err().unwrap_or_else(|| panic!("accepted a descriptor that should name {needle}"));
        assert!(err.message().contains(needle), "error for {needle}: {err}");
    }
    // Through the CLI: a clear failure, no panic.
    let dir = TempDir::new("desc-bad");
    fs::write(dir.join("DiskDescriptor.xml"), good.replace("<Blocksize>2048</Blocksize>", "<Blocksize>3000</Blocksize>")).unwrap();
    ploop(["info", dir.path().to_str().unwrap()]).expect_clean_failure().mentions(&["Blocksize"]);
    ploop(["add", "--image", dir.path().to_str().unwrap()]).expect_clean_failure();
}

/// One file named twice in ways no spelling rule sees (absolute and
/// relative, a symlink, a hard link) is refused when the disk is read,
/// before any command opens it twice.
#[test]
fn one_file_under_two_names_is_refused() {
    let dir = TempDir::new("desc-one-file");
    let d = dir.join("ct");
    ploop(["init", d.to_str().unwrap(), "--size", "64M"]).ok();
    ploop(["snapshot", d.to_str().unwrap()]).ok();
    let xml = fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    let top = Disk::load(&d).unwrap();
    let top_file = top.desc.image(top.desc.top).unwrap().file.clone();
    std::os::unix::fs::symlink("root.hds", d.join("alias.hds")).unwrap();
    fs::hard_link(d.join("root.hds"), d.join("linked.hds")).unwrap();
    let absolute = d.join("root.hds").to_str().unwrap().to_string();
    for other in [absolute.as_str(), "alias.hds", "linked.hds"] {
        fs::write(d.join("DiskDescriptor.xml"), xml.replace(&format!("<File>{top_file}</File>"), &format!("<File>{other}</File>"))).unwrap();
        ploop(["info", d.to_str().unwrap()]).expect_clean_failure().mentions(&["name one file"]);
        ploop(["check", d.to_str().unwrap()]).expect_clean_failure().mentions(&["name one file"]);
    }
    fs::write(d.join("DiskDescriptor.xml"), &xml).unwrap();
    fs::remove_file(d.join("linked.hds")).unwrap();
    ploop(["check", d.to_str().unwrap()]).ok();
}

/// A ploop volume's descriptor carries marks ours does not keep (the
/// parent volume it stands on, ReadOnly for one others stand on): refused,
/// never followed halfway or stored back without them.
#[test]
fn a_ploop_volume_descriptor_is_refused_and_left_as_it_is() {
    let dir = TempDir::new("desc-volume");
    let d = dir.join("ct");
    ploop(["init", d.to_str().unwrap(), "--size", "64M"]).ok();
    let xml = fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    let volume = "<StorageData>\n    <Volume>\n      <Parent>../base/DiskDescriptor.xml</Parent>\n      \
                  <SnapshotGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</SnapshotGUID>\n      <ReadOnly>1</ReadOnly>\n    </Volume>";
    assert!(xml.contains("<StorageData>"), "{xml}");
    let with_volume = xml.replacen("<StorageData>", volume, 1);
    fs::write(d.join("DiskDescriptor.xml"), &with_volume).unwrap();
    for verb in ["info", "check", "snapshot"] {
        ploop([verb, d.to_str().unwrap()]).expect_clean_failure().mentions(&["Volume"]);
    }
    assert_eq!(fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap(), with_volume);
}

#[test]
fn a_damaged_ploop_image_is_not_taken_for_a_raw_disk() {
    let dir = TempDir::new("desc-damaged");
    let img = dir.join("root.hds");
    ploop(["create", img.to_str().unwrap(), "--size", "64M"]).ok();
    // Damage the first bytes: the signature is gone.
    let mut bytes = fs::read(&img).unwrap();
    bytes[..16].copy_from_slice(b"garbage garbage!");
    fs::write(&img, &bytes).unwrap();
    let r = ploop(["check", img.to_str().unwrap()]);
    assert_eq!(r.code(), 2, "check must say damaged: {}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("not a valid ploop image"), "{}", r.stdout);
    ploop(["convert", img.to_str().unwrap(), dir.join("out.raw").to_str().unwrap(), "--to", "raw"])
        .expect_clean_failure()
        .mentions(&["not a valid ploop image"]);
    // Declared raw, it is read as raw (the user's choice).
    ploop(["check", img.to_str().unwrap(), "--format", "raw"]).ok();
}

/// A reload that fails (the descriptor damaged meanwhile) keeps the lock
/// the disk holds: the caller still works on the disk, and no other tool
/// may come in.
#[test]
fn a_failed_reload_keeps_the_lock() {
    let dir = TempDir::new("desc-reload");
    let d = dir.join("ct");
    block_on(Disk::init(&SyncIo, &d, 64 << 20, 1 << 20)).unwrap();
    let mut disk = Disk::load_locked(&d).unwrap();
    assert!(disk.holds_lock());
    let xml = d.join("DiskDescriptor.xml");
    let good = fs::read_to_string(&xml).unwrap();
    fs::write(&xml, "<Parallels_disk_image>").unwrap();
    assert!(disk.reload().is_err());
    assert!(disk.holds_lock(), "a failed reload dropped the lock");
    fs::write(&xml, good).unwrap();
    disk.reload().unwrap();
    assert!(disk.holds_lock());
}

#[test]
fn a_shot_with_a_reverse_merge_state_and_the_plain_mark_is_in_the_reverse_merge_state() {
    // ploop 9 reads TemporaryZeroSwap, then TemporaryZero, before
    // Temporary: a shot marked both ways is in the reverse merge's state.
    use ublk_ploop::disk::Temporary;
    let files = ["root.hds", "root.hds.{c4d3e2f1-a0b9-4c8d-9e7f-6a5b4c3d2e1f}", "root.hds.{1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d}"];
    let middle: Guid = "{7c2a9d41-1e5f-4a63-8b2d-6e0f9a8b7c65}".parse().unwrap();
    for (extra, want) in [
        ("<Temporary/>", Temporary::Temporary),
        ("<TemporaryZero/>", Temporary::Zero),
        ("<Temporary/><TemporaryZero/>", Temporary::Zero),
        ("<TemporaryZero/><Temporary/>", Temporary::Zero),
        ("<Temporary/><TemporaryZeroSwap/>", Temporary::ZeroSwap),
        ("<TemporaryZeroSwap/><TemporaryZero/>", Temporary::ZeroSwap),
    ] {
        let d = Descriptor::parse(&example(files, extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert_eq!(d.shot(middle).unwrap().temporary, want, "{extra}");
    }
}
