//! `crds/` must be exactly what `crdgen` prints from the Rust types.

use std::path::Path;

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut stale = Vec::new();
    let all = llama_operator::crdgen::all();
    for (file, crd) in &all {
        let want = llama_operator::crdgen::render(crd).expect("render CRD");
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if have != want {
            stale.push(*file);
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = all.iter().map(|(f, _)| f.to_string()).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "crds/ holds files crdgen does not produce"
    );
    assert!(
        stale.is_empty(),
        "stale CRDs {stale:?}: run `cargo run -p llama-operator --bin crdgen -- --out crds`"
    );
}

#[test]
fn every_schema_property_is_documented() {
    // `kubectl explain` prints these descriptions; an undocumented field is a bug.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                let is_meta = here.ends_with(".metadata")
                    || here.ends_with(".apiVersion")
                    || here.ends_with(".kind");
                let inside_condition = path.contains(".conditions");
                if sub.get("description").is_none() && !is_meta && !inside_condition {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for (_, crd) in llama_operator::crdgen::all() {
        let json = serde_json::to_value(&crd).expect("serialize");
        let kind = json["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        walk(
            &kind,
            &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a doc comment: {missing:?}"
    );
}
