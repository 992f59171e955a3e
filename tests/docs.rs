//! docs/profile-reference.md cannot drift from the real schema: every key each profile
//! table accepts (asked of the deserializer itself) is documented.

use imgbuild::profile::model::*;
use serde::de::DeserializeOwned;

fn keys<T: DeserializeOwned>() -> Vec<String> {
    let err = toml::from_str::<T>("__probe = 1")
        .err()
        .expect("probe key must be rejected")
        .to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no key list in: {err}"));
    list.replace(" or ", ",")
        .split(',')
        .map(|k| {
            k.trim()
                .trim_matches(|c: char| c == '`' || c.is_whitespace() || c == '\n')
                .to_string()
        })
        .filter(|k| !k.is_empty())
        .collect()
}

#[test]
fn profile_reference_documents_every_key() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/profile-reference.md"
    ))
    .unwrap();
    let tables: Vec<(&str, Vec<String>)> = vec![
        ("profile", keys::<Profile>()),
        ("host", keys::<HostSection>()),
        ("admin", keys::<Admin>()),
        ("ssh", keys::<Ssh>()),
        ("firewall", keys::<Firewall>()),
        ("wireguard", keys::<WireGuard>()),
        ("wireguard.peers", keys::<Peer>()),
        ("backup", keys::<Backup>()),
        ("backup.keep", keys::<Keep>()),
        ("proxy", keys::<Proxy>()),
        ("monitoring", keys::<Monitoring>()),
        ("monitoring.alerts", keys::<Alerts>()),
        ("networks", keys::<Network>()),
        ("volumes", keys::<Volume>()),
        ("volumes.postgres", keys::<PostgresVolume>()),
        ("containers.health", keys::<Health>()),
        ("containers", keys::<Container>()),
        ("files", keys::<ExtraFile>()),
    ];
    let mut missing = vec![];
    let mut n = 0;
    for (table, ks) in &tables {
        assert!(!ks.is_empty(), "{table}: no keys found");
        for k in ks {
            n += 1;
            let documented = doc.contains(&format!("`{k}`"))
                || (*table == "profile"
                    && (doc.contains(&format!("`[{k}]`"))
                        || doc.contains(&format!("`[{k}."))
                        || doc.contains(&format!("`[[{k}."))
                        || doc.contains(&format!("`[{k}"))));
            if !documented {
                missing.push(format!("{table}.{k}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/profile-reference.md lacks: {missing:?}"
    );
    assert!(n > 60, "only {n} keys probed");
}

#[test]
fn generated_man_pages_and_completions_are_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let written = imgbuild::gendocs::generate(tmp.path()).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    assert!(written.len() >= 10);
    for p in &written {
        let rel = p.strip_prefix(tmp.path()).unwrap();
        let committed = std::fs::read(repo.join(rel)).unwrap_or_default();
        assert!(
            committed == std::fs::read(p).unwrap(),
            "docs/{} is stale: run `imgbuild gen-docs docs`",
            rel.display()
        );
    }
    // And nothing stale is left over from a removed verb.
    for sub in ["man", "completions"] {
        for e in std::fs::read_dir(repo.join(sub)).unwrap().flatten() {
            assert!(
                written
                    .iter()
                    .any(|w| w.file_name() == Some(&e.file_name())),
                "docs/{sub}/{:?} is not generated any more",
                e.file_name()
            );
        }
    }
}
