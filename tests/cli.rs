//! The command line as users type it.

mod common;
use common::*;

#[test]
fn help_lists_every_verb() {
    let out = imgbuild().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let verbs = imgbuild::cli::verbs();
    assert!(verbs.len() >= 13, "{verbs:?}");
    for verb in &verbs {
        assert!(
            text.contains(&format!("  {verb} ")),
            "--help does not list `{verb}`:\n{text}"
        );
    }
}

#[test]
fn profile_name_first_is_build_and_extension_picks_the_format() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let out = tmp.path().join("vps1.ign");
    let stdout = run_ok(
        &[
            "services",
            "--allow-missing-credentials",
            "--out",
            out.to_str().unwrap(),
            "--secrets",
            s.to_str().unwrap(),
            "--helper-url",
            "https://example.org/imgbuild",
            "--json",
        ],
        &repo(),
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["format"], "ignition");
    assert_eq!(v["host"], "vps1");
    assert!(out.is_file());
    // The explicit form and a path to the file work the same.
    let out2 = tmp.path().join("second.ign");
    run_ok(
        &[
            "build",
            "profiles/services.toml",
            "--allow-missing-credentials",
            "--out",
            out2.to_str().unwrap(),
            "--secrets",
            s.to_str().unwrap(),
            "--helper-url",
            "https://example.org/imgbuild",
        ],
        &repo(),
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn unknown_output_extension_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let res = imgbuild()
        .current_dir(repo())
        .args([
            "services",
            "--out",
            tmp.path().join("vps1.zip").to_str().unwrap(),
            "--secrets",
            tmp.path().join("s").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1));
    assert!(stderr.contains("--format"), "{stderr}");
}

#[test]
fn environment_overlay_changes_what_it_says() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let prod: serde_json::Value = serde_json::from_str(&run_ok(
        &[
            "summary",
            "services",
            "--json",
            "--secrets",
            s.to_str().unwrap(),
        ],
        &repo(),
    ))
    .unwrap();
    let stag: serde_json::Value = serde_json::from_str(&run_ok(
        &[
            "summary",
            "services",
            "--env",
            "staging",
            "--json",
            "--secrets",
            s.to_str().unwrap(),
        ],
        &repo(),
    ))
    .unwrap();
    assert_eq!(prod["env"], "production");
    assert_eq!(stag["host"], "vps1-staging");
    assert_eq!(stag["backup"]["prefix"], "vps1-staging");
    assert_eq!(
        stag["peers"][0]["address"], "10.9.0.2",
        "the peer's staging address comes from its own profile"
    );
    let nc = stag["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nextcloud")
        .unwrap();
    assert_eq!(nc["domain"], "cloud.staging.example.org");
    assert_ne!(prod["tree_digest"], stag["tree_digest"]);
}

#[test]
fn overlay_file_can_replace_whole_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let overlay = tmp.path().join("test.toml");
    std::fs::write(&overlay, "replace = [\"containers\", \"volumes\", \"networks\", \"proxy\", \"backup\"]\n\n[volumes.www]\n\n[containers.web]\nimage = \"localhost/hello:1\"\npublish = [\"8080:8080\"]\nvolumes = [\"www:/www\"]\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(&run_ok(
        &[
            "summary",
            "services",
            "--overlay",
            overlay.to_str().unwrap(),
            "--json",
            "--secrets",
            tmp.path().join("s").to_str().unwrap(),
        ],
        &repo(),
    ))
    .unwrap();
    let names: Vec<&str> = v["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["web"]);
    assert!(v["backup"].is_null());
}

#[test]
fn a_restoring_host_without_credentials_is_refused_at_build_time() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let out = tmp.path().join("vps1.ign");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "services".to_string(),
            "--out".into(),
            out.display().to_string(),
            "--secrets".into(),
            s.display().to_string(),
            "--helper-url".into(),
            "https://example.org/imgbuild".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    // Production restores with restore = "require" and there is no s3.env.
    let res = imgbuild()
        .current_dir(repo())
        .args(args(&[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("s3.env does not exist")
            && stderr.contains("AWS_ACCESS_KEY_ID=")
            && stderr.contains("--allow-missing-credentials")
            && stderr.contains("imgbuild init"),
        "{stderr}"
    );
    assert!(!out.exists(), "a refused build left {}", out.display());
    // The explicit flag builds, with the warning.
    let res = imgbuild()
        .current_dir(repo())
        .args(args(&["--allow-missing-credentials"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("keep services down"),
        "{stderr}"
    );
    // Staging (allow-empty) builds, warning that backups will fail.
    let res = imgbuild()
        .current_dir(repo())
        .args(args(&["--env", "staging"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(stderr.contains("backups will fail"), "{stderr}");
    // With credentials in s3.env: no word about them.
    std::fs::write(
        s.join("vps1/s3.env"),
        "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=example\n",
    )
    .unwrap();
    let res = imgbuild()
        .current_dir(repo())
        .args(args(&[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(!stderr.contains("credentials"), "{stderr}");
    // An s3.env without the secret half is named as such.
    std::fs::write(s.join("vps1/s3.env"), "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\n").unwrap();
    let res = imgbuild()
        .current_dir(repo())
        .args(args(&[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lacks AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY"),
        "{stderr}"
    );
}

#[test]
fn summary_creates_no_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let res = imgbuild()
        .current_dir(repo())
        .args(["summary", "services", "--secrets", s.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(stdout.contains("host vps1"), "{stdout}");
    assert!(
        !s.exists() || std::fs::read_dir(&s).unwrap().next().is_none(),
        "summary wrote into the secrets dir: {:?}",
        std::fs::read_dir(&s).map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
    );
}

#[test]
fn check_read_data_subset_takes_a_fraction() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let check = |extra: &[&str]| {
        let res = imgbuild()
            .current_dir(repo())
            .args(["check", "services", "--secrets", s.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        (
            res.status.code(),
            String::from_utf8_lossy(&res.stderr).into_owned(),
        )
    };
    // Usage errors exit 2 and name the flag and the value.
    let (code, err) = check(&["--read-data-subset", "abc"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--read-data-subset")
            && err.contains("\"abc\" is not a fraction (use e.g. 10%, 0.1 or 1/10)"),
        "{err}"
    );
    let (code, err) = check(&["--read-data-subset", "150%"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("must be more than 0 and at most 100%"),
        "{err}"
    );
    let (code, err) = check(&["--read-data", "--read-data-subset", "10%"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    // Good fractions parse to the share they say (in process: no bucket involved).
    use clap::Parser;
    use imgbuild::snapshot::check::ReadData;
    for (arg, want) in [
        ("10%", ReadData::Subset(0.1)),
        ("0.25", ReadData::Subset(0.25)),
        ("1/10", ReadData::Subset(0.1)),
        ("100%", ReadData::All),
    ] {
        let cli = imgbuild::cli::Cli::try_parse_from([
            "imgbuild",
            "check",
            "services",
            "--read-data-subset",
            arg,
        ])
        .unwrap();
        let imgbuild::cli::Command::Check { args, .. } = cli.command else {
            panic!("{arg}: not the check verb");
        };
        assert_eq!(args.read(), Some(want), "{arg}");
        assert_eq!(args.profile.as_deref(), Some("services"));
    }
}

#[test]
fn check_without_a_profile_is_the_hosts_own_and_takes_no_bucket() {
    let (code, err) = {
        let res = imgbuild()
            .args(["check", "--bucket", "elsewhere"])
            .output()
            .unwrap();
        (
            res.status.code(),
            String::from_utf8_lossy(&res.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--bucket, --prefix and --endpoint need a profile"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("host.toml");
    let res = imgbuild()
        .args(["check", "--config", missing.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
}
