//! What a drilled guest is given, checked without booting it: the image the drill
//! builds carries dummy bucket credentials instead of the host's `s3.env`, the drill
//! credential names only the gateway, and `--allow-egress` with a deployable image
//! (which carries the real keys) is refused. So a guest allowed onto the internet
//! still reaches the bucket only through the read-only gateway.

mod common;
use common::repo;
use imgbuild::render::{self, Target};
use imgbuild::tree::{EntryKind, HostTree};

const KEY_ID: &str = "AKIAREALHOSTKEY0001";
const SECRET: &str = "real-secret-that-must-stay-on-the-workstation";

fn files_holding(tree: &HostTree, needle: &str) -> Vec<String> {
    tree.entries
        .values()
        .filter(|e| match &e.kind {
            EntryKind::File { content } => content
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            _ => false,
        })
        .map(|e| e.path.clone())
        .collect()
}

#[test]
fn a_drilled_guest_never_gets_the_real_bucket_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(secrets.join("vps1")).unwrap();
    std::fs::write(
        secrets.join("vps1/s3.env"),
        format!(
            "AWS_ACCESS_KEY_ID={KEY_ID}\nAWS_SECRET_ACCESS_KEY={SECRET}\nAWS_REGION=eu-west-3\n"
        ),
    )
    .unwrap();
    let profile = repo().join("profiles/services.toml");
    let (input, _) = render::prepare(
        profile.to_str().unwrap(),
        &Default::default(),
        Some(&secrets),
        &Default::default(),
    )
    .expect("the services profile");

    // The deployable image carries the keys (the host backs up with them)...
    let real = render::render(&input, Target::Image).unwrap();
    let s3_env = files_holding(&real, SECRET);
    assert_eq!(s3_env.len(), 1, "{s3_env:?}");
    // ...the drill's image does not, anywhere, and has the dummies in their place.
    let guest = imgbuild::drill::guest_input(&input);
    let drilled = render::render(&guest, Target::Image).unwrap();
    assert_eq!(files_holding(&drilled, SECRET), Vec::<String>::new());
    assert_eq!(files_holding(&drilled, KEY_ID), Vec::<String>::new());
    match &drilled.entries[&s3_env[0]].kind {
        EntryKind::File { content } => assert_eq!(
            String::from_utf8_lossy(content),
            imgbuild::drill::DRILL_S3_ENV
        ),
        other => panic!("{other:?}"),
    }
    // Everything else is the host as deployed.
    let differing: Vec<&String> = real
        .entries
        .keys()
        .filter(|k| real.entries.get(*k) != drilled.entries.get(*k))
        .collect();
    assert_eq!(differing, vec![&s3_env[0]]);
    assert_eq!(real.entries.len(), drilled.entries.len());

    // The credential QEMU passes names the gateway and nothing secret.
    let cfg = imgbuild::drill::drill_config(
        &input,
        "example-offsite-backups",
        "vps1",
        "20260101T000000.000Z-0a1b2c3d",
    );
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("http://10.0.2.100:80"), "{json}");
    assert!(!json.contains(SECRET) && !json.contains(KEY_ID), "{json}");

    // --allow-egress with --image: refused for an image with the real keys, allowed
    // for one whose signed tree shows none.
    let e = imgbuild::drill::check_image_for_egress(&real.digest(), &input)
        .expect_err("an image with the real keys must not get the internet")
        .to_string();
    assert!(e.contains("--allow-egress") && e.contains("s3.env"), "{e}");
    imgbuild::drill::check_image_for_egress(&drilled.digest(), &input).unwrap();
    let mut bare = input.clone();
    bare.keys.s3_env = None;
    let bare_tree = render::render(&bare, Target::Image).unwrap();
    imgbuild::drill::check_image_for_egress(&bare_tree.digest(), &input).unwrap();
}
