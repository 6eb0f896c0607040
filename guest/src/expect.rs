//! Expectations from the command line: space-separated `key=value` words.
//! `expect.cpus=N`, `expect.mem=BYTES` (decimal, optional K/M/G suffix,
//! binary multiples), `expect.now=UNIX_SECONDS`.

/// One parsed expectation.
#[derive(Clone, Copy, Debug)]
pub enum Expect<T> {
    /// Key not on the command line.
    Missing(&'static str),
    /// Key present but the value did not parse.
    Bad(&'static str),
    /// The value.
    Value(T),
}

impl<T: Copy> Expect<T> {
    /// The value, or the failure detail to print ("no expect.X given").
    pub fn get(&self) -> Result<T, &'static str> {
        match *self {
            Expect::Value(v) => Ok(v),
            Expect::Missing(why) | Expect::Bad(why) => Err(why),
        }
    }
}

/// All stage-1 expectations.
#[derive(Clone, Copy, Debug)]
pub struct Expectations {
    /// Number of vCPUs.
    pub cpus: Expect<u32>,
    /// Configured RAM in bytes.
    pub mem: Expect<u64>,
    /// Host time at launch (Unix seconds).
    pub now: Expect<u64>,
}

/// The value of the last `key=value` word for `key`, if any.
pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// Parses a decimal number with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    parse_u64(digits)?.checked_mul(mult)
}

/// The value of `key` as a number in `range` (inclusive), `default` if absent; an error if
/// malformed or out of range.
pub fn number(
    cmdline: &str,
    key: &str,
    default: u64,
    range: (u64, u64),
) -> Result<u64, crate::virtio::Why> {
    match value(cmdline, key) {
        None => Ok(default),
        Some(v) => parse_u64(v)
            .filter(|n| (range.0..=range.1).contains(n))
            .ok_or_else(|| crate::why!("bad {key}={v} (a number in {}..={})", range.0, range.1)),
    }
}

/// Parses a plain decimal u64 (no sign, no spaces).
pub fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

impl Expectations {
    /// Extracts the expectations from the command line.
    pub fn parse(cmdline: &str) -> Self {
        let cpus = match value(cmdline, "expect.cpus") {
            None => Expect::Missing("no expect.cpus given"),
            Some(v) => match parse_u64(v).and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n > 0 => Expect::Value(n),
                _ => Expect::Bad("bad expect.cpus value"),
            },
        };
        let mem = match value(cmdline, "expect.mem") {
            None => Expect::Missing("no expect.mem given"),
            Some(v) => parse_size(v).map_or(Expect::Bad("bad expect.mem value"), Expect::Value),
        };
        let now = match value(cmdline, "expect.now") {
            None => Expect::Missing("no expect.now given"),
            Some(v) => parse_u64(v).map_or(Expect::Bad("bad expect.now value"), Expect::Value),
        };
        Self { cpus, mem, now }
    }
}
