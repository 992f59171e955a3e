//! systemd's calendar events and time spans (`man systemd.time`), parsed by the rules
//! systemd itself applies (calendarspec.c, time-util.c), so a timer the host would refuse
//! to load is refused at build time instead. tests/systemd_time_crosscheck.rs runs the
//! real `systemd-analyze` over a list of expressions and asserts both agree.

use thiserror::Error;

pub const USEC_PER_SEC: u64 = 1_000_000;
const USEC_PER_MINUTE: u64 = 60 * USEC_PER_SEC;
const USEC_PER_HOUR: u64 = 60 * USEC_PER_MINUTE;
const USEC_PER_DAY: u64 = 24 * USEC_PER_HOUR;
const USEC_PER_WEEK: u64 = 7 * USEC_PER_DAY;
const USEC_PER_MONTH: u64 = 2_629_800 * USEC_PER_SEC;
const USEC_PER_YEAR: u64 = 31_557_600 * USEC_PER_SEC;
/// systemd's `USEC_INFINITY`.
pub const USEC_INFINITY: u64 = u64::MAX;

const MIN_YEAR: i64 = 1970;
const MAX_YEAR: i64 = 2199;
/// systemd caps a comma list at this many further elements.
const COMPONENTS_MAX: usize = 240;
/// 2200-01-01T00:00:00Z: the first `@` timestamp past MAX_YEAR.
const EPOCH_YEAR_2200: u64 = 7_258_118_400;
const INT_MAX: i64 = i32::MAX as i64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TimeError {
    #[error("empty expression")]
    Empty,
    #[error("unexpected `{0}`")]
    Unexpected(String),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("number out of range")]
    Range,
    #[error("{field} {value}: {why}")]
    OutOfRange {
        field: &'static str,
        value: String,
        why: String,
    },
}

fn unexpected(rest: &[u8]) -> TimeError {
    if rest.is_empty() {
        return TimeError::Invalid("expression ends too early");
    }
    let s = String::from_utf8_lossy(rest);
    let word: String = s.chars().take(12).collect();
    TimeError::Unexpected(word)
}

/// One element of a comma list: `start[..stop][/repeat]`; `stop` is -1 when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Component {
    start: i64,
    stop: i64,
    repeat: i64,
}

impl Component {
    fn constant(v: i64) -> Self {
        Component {
            start: v,
            stop: -1,
            repeat: 0,
        }
    }
}

/// `None` is `*`: any value.
type Chain = Option<Vec<Component>>;

/// A parsed `OnCalendar=` expression.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalendarSpec {
    weekdays: u8,
    end_of_month: bool,
    year: Chain,
    month: Chain,
    day: Chain,
    hour: Chain,
    minute: Chain,
    /// Microseconds within the minute.
    usec: Chain,
    utc: bool,
    timezone: Option<String>,
    /// An `@SECONDS` timestamp: one instant, never again.
    single_instant: bool,
}

impl CalendarSpec {
    /// The expression restricts the year (`2025-*-*`, `@1700000000`): it stops
    /// elapsing once those years are past.
    pub fn names_a_year(&self) -> bool {
        self.year.is_some() || self.single_instant
    }

    /// Whether any date ever matches (`*-02-30` never does). Without a year the
    /// pattern repeats every 400 years, so one Gregorian cycle settles it; with years,
    /// those years are searched. A valid expression always has a matching time of
    /// day, so the date decides. Daylight-saving gaps are ignored: they skip an hour
    /// on one day, never every day.
    pub fn ever_elapses(&self) -> bool {
        if self.single_instant {
            return true;
        }
        let years = if self.year.is_some() {
            MIN_YEAR..=MAX_YEAR
        } else {
            2000..=2399
        };
        for y in years {
            if !matches(&self.year, y) {
                continue;
            }
            for m in 1..=12 {
                if !matches(&self.month, m) {
                    continue;
                }
                let dim = days_in_month(y, m);
                for d in 1..=dim {
                    let day_ok = if self.end_of_month {
                        matches(&self.day, dim + 1 - d)
                    } else {
                        matches(&self.day, d)
                    };
                    if !day_ok {
                        continue;
                    }
                    let wd = (days_from_civil(y, m, d) + 3).rem_euclid(7);
                    if self.weekdays == 0 || self.weekdays & (1 << wd) != 0 {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// The time zone named at the end, if any (`UTC` included).
    pub fn timezone(&self) -> Option<&str> {
        if self.utc {
            Some("UTC")
        } else {
            self.timezone.as_deref()
        }
    }
}

fn matches(chain: &Chain, v: i64) -> bool {
    let Some(chain) = chain else { return true };
    chain.iter().any(|c| {
        if c.repeat > 0 {
            v >= c.start && (v - c.start) % c.repeat == 0 && (c.stop < 0 || v <= c.stop)
        } else {
            v == c.start
        }
    })
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A time zone name the host can resolve: systemd's `timezone_is_valid()` syntax, and a
/// name of the tz database (the list `timedatectl list-timezones` prints). Checked
/// against a list kept in the repository rather than /usr/share/zoneinfo, because the
/// build machine's zoneinfo (a Mac, a minimal container) says nothing about the image's.
pub fn timezone_is_valid(name: &str) -> bool {
    if name == "UTC" {
        return true;
    }
    if name.is_empty() || name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return false;
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'/'))
    {
        return false;
    }
    tz_names().any(|n| n == name)
}

/// Every name in the embedded tz list.
pub fn tz_names() -> impl Iterator<Item = &'static str> {
    include_str!("tz_names.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn strip_prefix_no_case<'a>(p: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (p.len() >= prefix.len() && p[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &p[prefix.len()..])
}

fn skip_spaces(p: &mut &[u8]) {
    while p.first() == Some(&b' ') {
        *p = &p[1..];
    }
}

/// Parses an `OnCalendar=` expression exactly as systemd's `calendar_spec_from_string()`.
///
/// One difference by design: systemd also accepts the abbreviations of the host's own
/// time zone (`CEST` on a host in Europe/Paris); those depend on the host, so only tz
/// database names (and `UTC`) are accepted here.
pub fn parse_calendar(input: &str) -> Result<CalendarSpec, TimeError> {
    let mut spec = CalendarSpec::default();
    let mut p = input.as_bytes();
    if p.len() >= 4 && p[p.len() - 4..].eq_ignore_ascii_case(b" UTC") {
        spec.utc = true;
        p = &p[..p.len() - 4];
    } else if let Some(i) = p.iter().rposition(|&b| b == b' ') {
        let name = std::str::from_utf8(&p[i + 1..]).unwrap_or("");
        if timezone_is_valid(name) {
            spec.timezone = Some(name.to_string());
            p = &p[..i];
        }
    }
    if p.is_empty() {
        return Err(TimeError::Empty);
    }

    let word = std::str::from_utf8(p).unwrap_or("").to_ascii_lowercase();
    let midnight = |spec: &mut CalendarSpec| {
        spec.hour = Some(vec![Component::constant(0)]);
        spec.minute = Some(vec![Component::constant(0)]);
        spec.usec = Some(vec![Component::constant(0)]);
    };
    let consts = |v: &[i64]| -> Chain { Some(v.iter().map(|&x| Component::constant(x)).collect()) };
    match word.as_str() {
        "minutely" => spec.usec = consts(&[0]),
        "hourly" => {
            spec.minute = consts(&[0]);
            spec.usec = consts(&[0]);
        }
        "daily" => midnight(&mut spec),
        "monthly" => {
            spec.day = consts(&[1]);
            midnight(&mut spec);
        }
        "annually" | "yearly" | "anually" => {
            spec.month = consts(&[1]);
            spec.day = consts(&[1]);
            midnight(&mut spec);
        }
        "weekly" => {
            spec.weekdays = 1;
            midnight(&mut spec);
        }
        "quarterly" => {
            spec.month = consts(&[1, 4, 7, 10]);
            spec.day = consts(&[1]);
            midnight(&mut spec);
        }
        "biannually" | "bi-annually" | "semiannually" | "semi-annually" => {
            spec.month = consts(&[1, 7]);
            spec.day = consts(&[1]);
            midnight(&mut spec);
        }
        _ => {
            parse_weekdays(&mut p, &mut spec)?;
            let instant = parse_date(&mut p, &mut spec)?;
            if !instant {
                parse_time(&mut p, &mut spec)?;
            }
            if !p.is_empty() {
                return Err(unexpected(p));
            }
        }
    }
    normalize(&mut spec);
    check_valid(&spec)?;
    Ok(spec)
}

fn parse_weekdays(p: &mut &[u8], c: &mut CalendarSpec) -> Result<(), TimeError> {
    const DAYS: [(&[u8], u8); 14] = [
        (b"Monday", 0),
        (b"Mon", 0),
        (b"Tuesday", 1),
        (b"Tue", 1),
        (b"Wednesday", 2),
        (b"Wed", 2),
        (b"Thursday", 3),
        (b"Thu", 3),
        (b"Friday", 4),
        (b"Fri", 4),
        (b"Saturday", 5),
        (b"Sat", 5),
        (b"Sunday", 6),
        (b"Sun", 6),
    ];
    let mut range_from: Option<u8> = None;
    let mut first = true;
    loop {
        let Some((rest, nr)) = DAYS
            .iter()
            .find_map(|(name, nr)| strip_prefix_no_case(p, name).map(|r| (r, *nr)))
        else {
            // No weekday here: the expression starts with the date.
            return if first { Ok(()) } else { Err(unexpected(p)) };
        };
        if !matches!(rest.first(), None | Some(b'-' | b'.' | b',' | b' ')) {
            return Err(unexpected(p));
        }
        c.weekdays |= 1 << nr;
        if let Some(from) = range_from {
            if from > nr {
                return Err(TimeError::Invalid("weekday range runs backwards"));
            }
            for j in from + 1..nr {
                c.weekdays |= 1 << j;
            }
        }
        *p = rest;
        match p.first() {
            None => return Ok(()),
            Some(b' ') => {
                skip_spaces(p);
                return Ok(());
            }
            Some(b'.') => {
                if range_from.is_some() || p.get(1) != Some(&b'.') {
                    return Err(unexpected(p));
                }
                range_from = Some(nr);
                *p = &p[2..];
            }
            // `-` is the old spelling of a range.
            Some(b'-') => {
                if range_from.is_some() {
                    return Err(unexpected(p));
                }
                range_from = Some(nr);
                *p = &p[1..];
            }
            Some(b',') => {
                range_from = None;
                *p = &p[1..];
            }
            Some(_) => {}
        }
        // A trailing comma is allowed, an open range is not.
        if matches!(p.first(), None | Some(b' ')) {
            skip_spaces(p);
            return if range_from.is_none() {
                Ok(())
            } else {
                Err(TimeError::Invalid("weekday range has no end"))
            };
        }
        first = false;
    }
}

/// Decimal digits as `strtoul` reads them (the caller has checked the first is a digit).
fn parse_digits(p: &mut &[u8]) -> Result<u64, TimeError> {
    let n = p.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return Err(unexpected(p));
    }
    let mut v: u64 = 0;
    for &b in &p[..n] {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(TimeError::Range)?;
    }
    *p = &p[n..];
    Ok(v)
}

/// systemd's `parse_fractional_part_u()`: `digits` places, rounded on the next digit.
fn parse_fraction(p: &mut &[u8], digits: usize) -> Result<u64, TimeError> {
    let mut val: u64 = 0;
    let mut i = 0;
    while i < digits {
        match p.first() {
            Some(b) if b.is_ascii_digit() => {
                val = val * 10 + u64::from(b - b'0');
                *p = &p[1..];
                i += 1;
            }
            _ if i == 0 => return Err(unexpected(p)),
            _ => {
                while i < digits {
                    val *= 10;
                    i += 1;
                }
            }
        }
    }
    if matches!(p.first(), Some(b'5'..=b'9')) {
        val += 1;
    }
    while p.first().is_some_and(u8::is_ascii_digit) {
        *p = &p[1..];
    }
    Ok(val)
}

fn parse_component_decimal(p: &mut &[u8], usec: bool) -> Result<i64, TimeError> {
    if !p.first().is_some_and(u8::is_ascii_digit) {
        return Err(unexpected(p));
    }
    let mut value = parse_digits(p)?;
    if usec {
        value = value.checked_mul(USEC_PER_SEC).ok_or(TimeError::Range)?;
        // One "." is a decimal point, ".." a range.
        if p.first() == Some(&b'.') && p.get(1) != Some(&b'.') {
            *p = &p[1..];
            let add = parse_fraction(p, 6)?;
            value = value.checked_add(add).ok_or(TimeError::Range)?;
        }
    }
    if value > INT_MAX as u64 {
        return Err(TimeError::Range);
    }
    Ok(value as i64)
}

fn parse_chain(p: &mut &[u8], usec: bool) -> Result<Chain, TimeError> {
    if p.first() == Some(&b'*') {
        *p = &p[1..];
        return Ok(if usec {
            Some(vec![Component {
                start: 0,
                stop: -1,
                repeat: USEC_PER_SEC as i64,
            }])
        } else {
            None
        });
    }
    let unit = if usec { USEC_PER_SEC as i64 } else { 1 };
    let mut chain = Vec::new();
    loop {
        if chain.len() > COMPONENTS_MAX {
            return Err(TimeError::Invalid("too many comma-separated values"));
        }
        let start = parse_component_decimal(p, usec)?;
        let mut stop = -1;
        let mut repeat = 0;
        if p.starts_with(b"..") {
            *p = &p[2..];
            stop = parse_component_decimal(p, usec)?;
            repeat = unit;
        }
        if p.first() == Some(&b'/') {
            *p = &p[1..];
            repeat = parse_component_decimal(p, usec)?;
            if repeat == 0 {
                return Err(TimeError::Invalid("repetition /0"));
            }
        } else {
            if start > INT_MAX - repeat {
                return Err(TimeError::Range);
            }
            // Without `/`, a seconds range steps by whole seconds: it must span one.
            if usec && stop >= 0 && start + repeat > stop {
                return Err(TimeError::Invalid("seconds range shorter than a second"));
            }
        }
        if !matches!(p.first(), None | Some(b' ' | b',' | b'-' | b'~' | b':')) {
            return Err(unexpected(p));
        }
        chain.push(Component {
            start,
            stop,
            repeat,
        });
        if p.first() == Some(&b',') {
            *p = &p[1..];
            continue;
        }
        return Ok(Some(chain));
    }
}

/// The date part; true for an `@SECONDS` timestamp (no time of day follows).
fn parse_date(p: &mut &[u8], c: &mut CalendarSpec) -> Result<bool, TimeError> {
    if p.is_empty() {
        return Ok(false);
    }
    if p[0] == b'@' {
        *p = &p[1..];
        let secs = parse_digits(p)?;
        if secs > i64::MAX as u64 {
            return Err(TimeError::Range);
        }
        if secs >= EPOCH_YEAR_2200 {
            return Err(TimeError::OutOfRange {
                field: "timestamp",
                value: format!("@{secs}"),
                why: format!("after the year {MAX_YEAR}"),
            });
        }
        c.single_instant = true;
        c.utc = true;
        return Ok(true);
    }
    let mut t = *p;
    let first = parse_chain(&mut t, false)?;
    // The end, or a ':': that was the hour, not a date.
    if matches!(t.first(), None | Some(b':')) {
        return Ok(false);
    }
    match t.first() {
        Some(b'~') => c.end_of_month = true,
        Some(b'-') => {}
        _ => return Err(unexpected(t)),
    }
    t = &t[1..];
    let second = parse_chain(&mut t, false)?;
    if matches!(t.first(), None | Some(b' ')) {
        skip_spaces(&mut t);
        *p = t;
        c.month = first;
        c.day = second;
        return Ok(false);
    } else if c.end_of_month {
        return Err(unexpected(t));
    }
    match t.first() {
        Some(b'~') => c.end_of_month = true,
        Some(b'-') => {}
        _ => return Err(unexpected(t)),
    }
    t = &t[1..];
    let third = parse_chain(&mut t, false)?;
    if !matches!(t.first(), None | Some(b' ')) {
        return Err(unexpected(t));
    }
    skip_spaces(&mut t);
    *p = t;
    c.year = first;
    c.month = second;
    c.day = third;
    Ok(false)
}

fn parse_time(p: &mut &[u8], c: &mut CalendarSpec) -> Result<(), TimeError> {
    let zero = || Some(vec![Component::constant(0)]);
    if p.is_empty() {
        c.hour = zero();
        c.minute = zero();
        c.usec = zero();
        return Ok(());
    }
    let hour = parse_chain(p, false)?;
    if p.first() != Some(&b':') {
        return Err(unexpected(p));
    }
    *p = &p[1..];
    let minute = parse_chain(p, false)?;
    let usec = if p.is_empty() {
        zero()
    } else {
        if p.first() != Some(&b':') {
            return Err(unexpected(p));
        }
        *p = &p[1..];
        let s = parse_chain(p, true)?;
        if !p.is_empty() {
            return Err(unexpected(p));
        }
        s
    };
    c.hour = hour;
    c.minute = minute;
    c.usec = usec;
    Ok(())
}

fn normalize(c: &mut CalendarSpec) {
    if c.timezone.as_deref() == Some("UTC") {
        c.utc = true;
        c.timezone = None;
    }
    if c.end_of_month && c.day.is_none() {
        c.end_of_month = false;
    }
    // Two-digit years: 12 is 2012, 89 is 1989.
    if let Some(years) = &mut c.year {
        for y in years.iter_mut() {
            for v in [&mut y.start, &mut y.stop] {
                if (0..70).contains(v) {
                    *v += 2000;
                } else if (70..100).contains(v) {
                    *v += 1900;
                }
            }
        }
    }
    for chain in [
        &mut c.year,
        &mut c.month,
        &mut c.day,
        &mut c.hour,
        &mut c.minute,
        &mut c.usec,
    ]
    .into_iter()
    .flatten()
    {
        for comp in chain.iter_mut() {
            // A range is cut to a whole number of repetitions.
            if comp.stop > comp.start && comp.repeat > 0 {
                comp.stop -= (comp.stop - comp.start) % comp.repeat;
            }
            // A repetition that cannot fire twice, or a range of one value, is a
            // single value (`5..5`, `1..5/10`).
            if (comp.stop > comp.start && comp.repeat > 0 && comp.start + comp.repeat > comp.stop)
                || comp.start == comp.stop
            {
                comp.repeat = 0;
                comp.stop = -1;
            }
        }
    }
}

fn chain_valid(
    chain: &Chain,
    field: &'static str,
    from: i64,
    to: i64,
    end_of_month: bool,
) -> Result<(), TimeError> {
    let Some(chain) = chain else { return Ok(()) };
    // Days counted from the end of the month stop 28 days back.
    let to = if end_of_month { to - 3 } else { to };
    let scale = if field == "second" {
        USEC_PER_SEC as i64
    } else {
        1
    };
    let show = |v: i64| {
        if v % scale == 0 {
            (v / scale).to_string()
        } else {
            format!("{}.{:06}", v / scale, v % scale)
        }
    };
    for c in chain {
        let bad = |value: i64| TimeError::OutOfRange {
            field,
            value: show(value),
            why: format!("out of range {}-{}", show(from), show(to)),
        };
        if c.start < from || c.start > to {
            return Err(bad(c.start));
        }
        if c.repeat > to - from {
            return Err(TimeError::OutOfRange {
                field,
                value: format!("/{}", show(c.repeat)),
                why: format!(
                    "repetition longer than the range {}-{}",
                    show(from),
                    show(to)
                ),
            });
        }
        let never = TimeError::OutOfRange {
            field,
            value: format!(
                "{}{}/{}",
                show(c.start),
                if c.stop >= 0 {
                    format!("..{}", show(c.stop))
                } else {
                    String::new()
                },
                show(c.repeat)
            ),
            why: format!("the repetition never fits before {}", show(to)),
        };
        if c.stop >= 0 {
            if c.stop < from || c.stop > to {
                return Err(bad(c.stop));
            }
            if c.start + c.repeat > c.stop {
                return Err(never);
            }
        } else if end_of_month {
            if c.start - c.repeat < from {
                return Err(never);
            }
        } else if c.start + c.repeat > to {
            return Err(never);
        }
    }
    Ok(())
}

fn check_valid(c: &CalendarSpec) -> Result<(), TimeError> {
    chain_valid(&c.year, "year", MIN_YEAR, MAX_YEAR, false)?;
    chain_valid(&c.month, "month", 1, 12, false)?;
    chain_valid(&c.day, "day", 1, 31, c.end_of_month)?;
    chain_valid(&c.hour, "hour", 0, 23, false)?;
    chain_valid(&c.minute, "minute", 0, 59, false)?;
    chain_valid(&c.usec, "second", 0, 60 * USEC_PER_SEC as i64 - 1, false)?;
    Ok(())
}

/// systemd's `WHITESPACE`.
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(p: &mut &[u8]) {
    while p.first().is_some_and(|&b| is_ws(b)) {
        *p = &p[1..];
    }
}

fn extract_multiplier(p: &[u8]) -> Option<(&[u8], u64)> {
    const UNITS: [(&str, u64); 30] = [
        ("seconds", USEC_PER_SEC),
        ("second", USEC_PER_SEC),
        ("sec", USEC_PER_SEC),
        ("s", USEC_PER_SEC),
        ("minutes", USEC_PER_MINUTE),
        ("minute", USEC_PER_MINUTE),
        ("min", USEC_PER_MINUTE),
        ("months", USEC_PER_MONTH),
        ("month", USEC_PER_MONTH),
        ("M", USEC_PER_MONTH),
        ("msec", 1000),
        ("ms", 1000),
        ("m", USEC_PER_MINUTE),
        ("hours", USEC_PER_HOUR),
        ("hour", USEC_PER_HOUR),
        ("hr", USEC_PER_HOUR),
        ("h", USEC_PER_HOUR),
        ("days", USEC_PER_DAY),
        ("day", USEC_PER_DAY),
        ("d", USEC_PER_DAY),
        ("weeks", USEC_PER_WEEK),
        ("week", USEC_PER_WEEK),
        ("w", USEC_PER_WEEK),
        ("years", USEC_PER_YEAR),
        ("year", USEC_PER_YEAR),
        ("y", USEC_PER_YEAR),
        ("usec", 1),
        ("us", 1),
        ("\u{3bc}s", 1),
        ("\u{b5}s", 1),
    ];
    UNITS
        .iter()
        .find_map(|(u, m)| p.strip_prefix(u.as_bytes()).map(|rest| (rest, *m)))
}

/// `strtoll()` on a string that does not start with `-` or whitespace: an optional
/// `+`, then digits. Returns the value and the rest, or None when nothing converts.
fn strtoll(p: &[u8]) -> Result<Option<(u64, &[u8])>, TimeError> {
    let digits = p.strip_prefix(b"+").unwrap_or(p);
    if !digits.first().is_some_and(u8::is_ascii_digit) {
        return Ok(None);
    }
    let mut rest = digits;
    let v = parse_digits(&mut rest)?;
    if v > i64::MAX as u64 {
        return Err(TimeError::Range);
    }
    Ok(Some((v, rest)))
}

/// Parses a time span (`RandomizedDelaySec=`, `TimeoutStartSec=`...) as systemd's
/// `parse_sec()`: a bare number is seconds. Returns microseconds.
pub fn parse_timespan(input: &str) -> Result<u64, TimeError> {
    let mut p = input.as_bytes();
    skip_ws(&mut p);
    if let Some(mut rest) = p.strip_prefix(b"infinity") {
        skip_ws(&mut rest);
        return if rest.is_empty() {
            Ok(USEC_INFINITY)
        } else {
            Err(unexpected(rest))
        };
    }
    let mut usec: u64 = 0;
    let mut something = false;
    loop {
        skip_ws(&mut p);
        if p.is_empty() {
            return if something {
                Ok(usec)
            } else {
                Err(TimeError::Empty)
            };
        }
        if p[0] == b'-' {
            return Err(TimeError::Invalid("negative time span"));
        }
        let (l, e) = match strtoll(p)? {
            Some(x) => x,
            // Nothing converted: only a leading "." (".5s") may go on.
            None if p[0] == b'.' => (0, p),
            None => return Err(unexpected(p)),
        };
        let fraction = e.first() == Some(&b'.');
        let mut after = if fraction {
            let mut q = &e[1..];
            while q.first().is_some_and(u8::is_ascii_digit) {
                q = &q[1..];
            }
            q
        } else {
            e
        };
        let mut unit_at = after;
        skip_ws(&mut unit_at);
        let (rest, multiplier) = match extract_multiplier(unit_at) {
            Some(x) => x,
            None => (unit_at, USEC_PER_SEC),
        };
        // "12.34.56" is refused; "12.34 .56" and "12.34s.56" are not.
        if rest.len() == after.len() && !rest.is_empty() {
            return Err(unexpected(rest));
        }
        after = rest;
        if l >= USEC_INFINITY / multiplier {
            return Err(TimeError::Range);
        }
        let k = l * multiplier;
        if k >= USEC_INFINITY - usec {
            return Err(TimeError::Range);
        }
        usec += k;
        something = true;
        if fraction {
            let mut m = multiplier / 10;
            let digits: Vec<u8> = e[1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            if digits.is_empty() {
                return Err(TimeError::Invalid("a decimal point needs digits after it"));
            }
            for d in digits {
                let k = u64::from(d - b'0') * m;
                if k >= USEC_INFINITY - usec {
                    return Err(TimeError::Range);
                }
                usec += k;
                m /= 10;
            }
        }
        p = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) {
        if let Err(e) = parse_calendar(s) {
            panic!("`{s}` should parse: {e}");
        }
    }
    fn bad(s: &str) {
        assert!(parse_calendar(s).is_err(), "`{s}` should be refused");
    }

    #[test]
    fn shorthands_any_case() {
        for s in [
            "minutely",
            "hourly",
            "daily",
            "DAILY",
            "weekly",
            "monthly",
            "yearly",
            "annually",
            "quarterly",
            "semiannually",
            "semi-annually",
            "biannually",
            "daily UTC",
            "weekly Europe/Paris",
        ] {
            ok(s);
        }
        bad("dayly");
        bad("daily ");
        bad(" daily");
        bad("fortnightly");
    }

    #[test]
    fn full_and_partial_forms() {
        for s in [
            "*-*-* 03:00:00",
            "*-*-* 03:15",
            "*-*-*  03:00",
            "03:15",
            "*:0/15",
            "*:*:0/20",
            "Mon..Fri 22:30",
            "Mon-Fri 22:30",
            "Sat,Sun 10:00",
            "Mon,Tue,",
            "Monday",
            "2025-01-01",
            "25-01-01 00:00",
            "*-*-1,15 04:00:00",
            "*-02~01",
            "*-*~03..05",
            "*-01,04,07,10-01 00:00:00",
            "*-*-* 00/2:00",
            "*-*-* 08..18/2:00",
            "*-*-* 12:00:30.5",
            "*-*-* 12:00:00..30/10",
            "5..5:00",
            "*-*-* 1..5/10:00",
            "@1700000000",
            "*-*-* 03:00:00 UTC",
            "*-*-* 03:00:00 utc",
            "*-*-* 03:00:00 Europe/Paris",
            "Fri *-*-* 23:59:59 America/New_York",
        ] {
            ok(s);
        }
    }

    #[test]
    fn refused_like_systemd() {
        for s in [
            "",
            "UTC",
            "*-*-* 24:00:00",
            "*-*-* 23:60:00",
            "*-*-* 23:59:60",
            "*-13-01",
            "*-02-32",
            "*-*-0",
            "1969-01-01",
            "2200-01-01",
            "*:0/60",
            "*:0/0",
            "*-*-* 12:00:59/1",
            "Fri..Mon",
            "Mon..",
            "Mon..Wed..Fri",
            "Mond 10:00",
            "Mon,5",
            "*-*-* 03:00:00 Mars/Olympus",
            "*-*-* 03:00:00 CEST",
            "*-*-* 3.00",
            "*-*~01-01",
            "*-*-* 03:00:00\n",
            "10..5:00",
            "5..4:00",
            "*-*-* 12:00:00..00.5",
            "*-*~29",
            "@7258118400",
            "daily\u{e9}",
            "\u{e9}",
            "Mon\u{e9}",
        ] {
            bad(s);
        }
    }

    #[test]
    fn long_lists_are_capped() {
        let list = |n: usize| (0..n).map(|i| (i % 60).to_string()).collect::<Vec<_>>();
        ok(&format!("*:{}", list(241).join(",")));
        bad(&format!("*:{}", list(242).join(",")));
    }

    #[test]
    fn out_of_range_messages_name_the_field() {
        let e = parse_calendar("*-*-* 25:00").unwrap_err().to_string();
        assert!(e.contains("hour 25"), "{e}");
        let e = parse_calendar("*-*-* 10:00:61").unwrap_err().to_string();
        assert!(e.contains("second 61"), "{e}");
    }

    #[test]
    fn dates_that_never_come() {
        for s in [
            "*-02-30",
            "*-04-31",
            "*-02,04,06-31",
            "Mon *-02-30",
            "2025-02-29",
        ] {
            assert!(!parse_calendar(s).unwrap().ever_elapses(), "{s}");
        }
        for s in [
            "daily",
            "*-02-29",
            "Mon *-02-29",
            "*-02~28",
            "Fri *-*-13",
            "2028-02-29",
            "Sun *-12-25",
        ] {
            assert!(parse_calendar(s).unwrap().ever_elapses(), "{s}");
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn years_and_instants_are_reported() {
        assert!(!parse_calendar("*-*-* 03:00").unwrap().names_a_year());
        assert!(parse_calendar("2030-*-* 03:00").unwrap().names_a_year());
        assert!(parse_calendar("@1700000000").unwrap().names_a_year());
        assert_eq!(
            parse_calendar("daily Europe/Paris").unwrap().timezone(),
            Some("Europe/Paris")
        );
    }

    #[test]
    fn timespans() {
        let cases: &[(&str, u64)] = &[
            ("5", 5 * USEC_PER_SEC),
            ("5s", 5 * USEC_PER_SEC),
            ("5min", 300 * USEC_PER_SEC),
            ("5m", 300 * USEC_PER_SEC),
            ("5M", 5 * USEC_PER_MONTH),
            ("1h 30min", 5400 * USEC_PER_SEC),
            ("1h30min", 5400 * USEC_PER_SEC),
            ("2.5s", 2_500_000),
            (".5s", 500_000),
            ("+5s", 5 * USEC_PER_SEC),
            ("5 s", 5 * USEC_PER_SEC),
            ("  10ms  ", 10_000),
            ("1\u{b5}s", 1),
            ("1\u{3bc}s", 1),
            ("1y", USEC_PER_YEAR),
            ("infinity", USEC_INFINITY),
            ("12.34 .56", 12_340_000 + 560_000),
        ];
        for (s, want) in cases {
            assert_eq!(parse_timespan(s), Ok(*want), "`{s}`");
        }
        for s in [
            "",
            "  ",
            "-5s",
            "5x",
            "5.",
            "5.s",
            "12.34.56",
            "s",
            "infinity s",
            "5 5x",
            "+-5",
            "1.5.5s",
        ] {
            assert!(parse_timespan(s).is_err(), "`{s}` should be refused");
        }
        assert!(parse_timespan("99999999999999999999").is_err());
        assert!(parse_timespan("18446744073709551615us").is_err());
    }

    #[test]
    fn time_zones() {
        for tz in [
            "UTC",
            "Europe/Paris",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
        ] {
            assert!(timezone_is_valid(tz), "{tz}");
        }
        for tz in [
            "",
            "Europe/Pari",
            "europe/paris",
            "/Europe/Paris",
            "Europe//Paris",
            "Europe/Paris/",
            "../etc/passwd",
            "CEST",
            "localtime",
            "posixrules",
        ] {
            assert!(!timezone_is_valid(tz), "{tz}");
        }
    }
}
