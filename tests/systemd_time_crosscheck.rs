//! The build-time calendar and time-span parsers agree with the real systemd: every
//! expression below goes through `systemd-analyze calendar` / `timespan` and through
//! `imgbuild::profile::systemd_time`, and both must accept or refuse it alike (time
//! spans: to the same microsecond; calendars: also whether it ever elapses).
//! systemd-analyze runs with TZ=UTC, so that the local zone's abbreviations, which
//! systemd also accepts and which depend on the host, play no part.

mod common;
use common::*;
use imgbuild::profile::systemd_time::{parse_calendar, parse_timespan, tz_names};
use std::process::Command;

const CALENDARS: &[&str] = &[
    // shorthands
    "minutely",
    "hourly",
    "daily",
    "DAILY",
    "Daily",
    "weekly",
    "monthly",
    "yearly",
    "annually",
    "anually",
    "quarterly",
    "semiannually",
    "semi-annually",
    "biannually",
    "bi-annually",
    "dayly",
    "fortnightly",
    "daily ",
    " daily",
    "daily  UTC",
    "daily UTC",
    "daily utc",
    "daily Europe/Paris",
    "daily Europe/Pari",
    "daily europe/paris",
    "daily America/Argentina/Buenos_Aires",
    "daily Etc/GMT+5",
    "daily Mars/Olympus",
    "UTC",
    "",
    " ",
    // full and partial forms
    "*-*-* 03:00:00",
    "*-*-* 03:15:00",
    "*-*-* 04:15:00",
    "*-*-* 03:15",
    "*-*-*  03:00",
    "*-*-* 3:5",
    "03:15",
    "3:15:7",
    "*:0/15",
    "*:*:0/20",
    "*:*:*",
    "*:*",
    "*",
    "**",
    "*-*",
    "*-*-*",
    "*-*-*-*",
    "*-*-* *:*:*",
    "*-*-* 00/2:00",
    "*-*-* 08..18/2:00",
    "*-*-* 08..18:00",
    "*-*-* 18..08:00",
    "5..5:00",
    "5..4:00",
    "*-*-* 1..5/10:00",
    "*-*-* 12:00:30.5",
    "*-*-* 12:00:30.1234567",
    "*-*-* 12:00:30.",
    "*-*-* 12:00:.5",
    "*-*-* 12:00:00..30/10",
    "*-*-* 12:00:00..00.5",
    "*-*-* 12:00:10..10",
    "*-*-* 12:00:59/1",
    "*-*-* 12:00:58/1",
    "*-*-* 12:00:00/0.5",
    "*-*-* 12:00:0/0",
    "*-*-* 24:00:00",
    "*-*-* 23:60:00",
    "*-*-* 23:59:60",
    "*-*-* 23:59:59",
    "*-*-* 0:0:0",
    "*-*-* 3.00",
    "*-*-* 03:00:00:00",
    "*-*-* 03-00",
    "*-*-* 03:00 foo",
    "*-*-* 03:00:00 CEST",
    "*-*-* 03:00:00 Europe/Paris",
    "Fri *-*-* 23:59:59 America/New_York",
    "*-*-1,15 04:00:00",
    "*-01,04,07,10-01 00:00:00",
    "*-1,,2-01",
    "*-1,-01",
    "*-13-01",
    "*-0-01",
    "*-12-31",
    "*-02-32",
    "*-*-0",
    "*-02-30",
    "*-04-31",
    "*-02-29",
    "*-02,04,06-31",
    "2025-01-01",
    "25-01-01 00:00",
    "99-01-01",
    "1969-01-01",
    "1970-01-01 00:00:00",
    "2199-12-31",
    "2200-01-01",
    "2030..2040-01-01",
    "2030/2-01-01",
    "4294967296-01-01",
    "99999999999999999999-01-01",
    // end of month
    "*-02~01",
    "*-02~28",
    "*-*~03..05",
    "*-*~29",
    "*-*~28",
    "*-*~01/7",
    "*-*~07/7",
    "*~01",
    "*-*~*",
    "*-*~01-01",
    "*~*~*",
    // weekdays
    "Mon",
    "Monday",
    "monday",
    "MON 10:00",
    "Mon..Fri 22:30",
    "Mon-Fri 22:30",
    "Fri..Mon",
    "Sat,Sun 10:00",
    "Sat,Sun,",
    "Mon,Tue,",
    "Mon,",
    "Mon, 03:00",
    "Mon..",
    "Mon.Fri",
    "Mon..Wed..Fri",
    "Mon-Wed-Fri",
    "Mon..Wed,Fri..Sun",
    "Mond 10:00",
    "Mon,5",
    "Mon  *-*-* 03:00",
    "Mon *-02-30",
    "Mon *-02-29",
    "Fri *-*-13",
    "Sun *-12-25 10:00",
    "Mon..Sun",
    "Tue *-*-* 1,2,3:00",
    // epoch
    "@1700000000",
    "@0",
    "@7258118399",
    "@7258118400",
    "@",
    "@-1",
    "@12x",
    // junk
    "03:00 tomorrow",
    "every day",
    "*-*-*\t03:00",
    "*-*-* 03:00:00\n",
    "%H:00",
    "1,2,3,4,5,6,7,8,9,10,11,12-*",
];

const TIMESPANS: &[&str] = &[
    "5",
    "0",
    "5s",
    "5sec",
    "5 sec",
    "5seconds",
    "5min",
    "5m",
    "5M",
    "5month",
    "5ms",
    "5msec",
    "5us",
    "5usec",
    "5µs",
    "5μs",
    "1h",
    "1hr",
    "1hour",
    "2hours",
    "1d",
    "2days",
    "1w",
    "1week",
    "1y",
    "1year",
    "1h 30min",
    "1h30min",
    "1h30min15s",
    "2.5s",
    "2.5min",
    ".5s",
    "+5s",
    "  10ms  ",
    "infinity",
    " infinity ",
    "infinity s",
    "infinityx",
    "",
    "  ",
    "-5s",
    "-0",
    "5x",
    "5.",
    "5.s",
    "12.34.56",
    "12.34 .56",
    "12.34s.56",
    "s",
    "5 5",
    "5 5x",
    "+-5",
    "1.5.5s",
    "5 minutes 3 seconds",
    "5S",
    "5H",
    "1.0000005s",
    "99999999999999999999",
    "18446744073709551615us",
    "18446744073709551614us",
    "584542y",
    "500000y",
    "30s,",
];

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .env("TZ", "UTC")
        .env("LC_ALL", "C")
        .output()
        .expect("systemd-analyze runs")
}

#[test]
fn calendar_parser_agrees_with_systemd() {
    require_tool(
        &["systemd-analyze", "--version"],
        "systemd-analyze (systemd)",
    );
    let mut disagree = vec![];
    let mut n_ok = 0;
    for expr in CALENDARS {
        let out = analyze(&["calendar", expr]);
        let systemd_ok = out.status.success();
        let ours = parse_calendar(expr);
        if systemd_ok != ours.is_ok() {
            disagree.push(format!(
                "{expr:?}: systemd {}, ours {:?}",
                if systemd_ok { "accepts" } else { "refuses" },
                ours.map(|_| ()),
            ));
            continue;
        }
        let Ok(spec) = ours else { continue };
        n_ok += 1;
        // With a year, "never" also depends on today's date; without one it is fixed.
        if !spec.names_a_year() {
            let never = String::from_utf8_lossy(&out.stdout).contains("Next elapse: never");
            if never == spec.ever_elapses() {
                disagree.push(format!(
                    "{expr:?}: systemd says it {} elapses, ours the opposite",
                    if never { "never" } else { "" }
                ));
            }
        }
    }
    assert!(
        disagree.is_empty(),
        "parsers disagree on {} of {} expressions:\n{}",
        disagree.len(),
        CALENDARS.len(),
        disagree.join("\n")
    );
    assert!(n_ok > 40 && CALENDARS.len() - n_ok > 40, "{n_ok} valid");
    println!(
        "{} calendar expressions, {n_ok} valid: systemd and imgbuild agree",
        CALENDARS.len()
    );
}

#[test]
fn timespan_parser_agrees_with_systemd() {
    require_tool(
        &["systemd-analyze", "--version"],
        "systemd-analyze (systemd)",
    );
    let mut disagree = vec![];
    for expr in TIMESPANS {
        let out = analyze(&["timespan", expr]);
        let systemd: Option<u64> = out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| {
                    let l = l.trim();
                    // "us:" in the C locale, "μs:" in a UTF-8 one.
                    l.strip_prefix("us: ").or_else(|| l.strip_prefix("μs: "))
                })
                .and_then(|v| v.trim().parse().ok())
                .expect("a us: line")
        });
        let ours = parse_timespan(expr).ok();
        if systemd != ours {
            disagree.push(format!("{expr:?}: systemd {systemd:?}, ours {ours:?}"));
        }
    }
    assert!(disagree.is_empty(), "disagree:\n{}", disagree.join("\n"));
}

#[test]
fn every_listed_time_zone_is_one_systemd_accepts() {
    require_tool(
        &["systemd-analyze", "--version"],
        "systemd-analyze (systemd)",
    );
    let names: Vec<&str> = tz_names().collect();
    assert!(names.len() > 500, "{} names", names.len());
    let exprs: Vec<String> = names.iter().map(|n| format!("daily {n}")).collect();
    let mut args = vec!["calendar"];
    args.extend(exprs.iter().map(String::as_str));
    let out = analyze(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd refuses some listed zones (is this machine's tzdata older than the list?):\n{}",
        stderr
            .lines()
            .filter(|l| l.contains("Failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for n in &names {
        assert!(parse_calendar(&format!("daily {n}")).is_ok(), "{n}");
    }
}

/// Names systemd accepts on this machine only because of files the image may not
/// have (Debian trixie moved posix/ and right/ to tzdata-legacy; `localtime` is the
/// build machine's own setting): refused here on purpose.
#[test]
fn machine_specific_zone_files_are_refused() {
    for tz in ["localtime", "posixrules", "posix/Europe/Paris", "right/UTC"] {
        assert!(parse_calendar(&format!("daily {tz}")).is_err(), "{tz}");
    }
}
