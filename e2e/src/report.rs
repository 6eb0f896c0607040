//! The test guest's output protocol, parsed ([`GuestReport`]).

use std::fmt::Write as _;

/// One `TEST` line: (name, passed, detail).
pub type TestLine = (String, bool, String);

/// The guest's output, parsed. Protocol (one item per line, see
/// docs/test-guest.md): `NIMBUS-TEST-GUEST <stage>` banner,
/// `TEST <name> PASS|FAIL <detail>`, `INFO <text>`, `BENCH <text>`,
/// `FAULT <text>`, and finally `TESTS DONE pass=N fail=M`. Anything else
/// (firmware output) is ignored.
#[derive(Debug, Clone, Default)]
pub struct GuestReport {
    /// The banner line, if seen (e.g. `NIMBUS-TEST-GUEST stage1`).
    pub banner: Option<String>,
    /// Every `TEST` line in order; malformed ones are recorded as failures.
    pub tests: Vec<TestLine>,
    /// `TESTS DONE` counts: (pass, fail).
    pub done: Option<(u32, u32)>,
    /// Text after `FAULT ` of every fault line.
    pub faults: Vec<String>,
    /// Text after `INFO ` of every info line.
    pub infos: Vec<String>,
    /// Text after `BENCH ` of every benchmark line.
    pub benches: Vec<String>,
    /// The complete output the report was parsed from.
    pub raw: String,
}

impl GuestReport {
    /// Parses guest serial output.
    pub fn parse(output: &str) -> Self {
        let mut r = GuestReport {
            raw: output.to_string(),
            ..Default::default()
        };
        for line in output.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(pos) = line.find("NIMBUS-TEST-GUEST") {
                r.banner
                    .get_or_insert_with(|| line[pos..].trim().to_string());
            } else if let Some(rest) = line.strip_prefix("TESTS DONE ") {
                r.done = parse_done(rest).or(Some((0, u32::MAX)));
            } else if let Some(rest) = line.strip_prefix("TEST ") {
                r.tests.push(parse_test(rest));
            } else if let Some(rest) = line.strip_prefix("FAULT") {
                r.faults.push(rest.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("INFO ") {
                r.infos.push(rest.to_string());
            } else if let Some(rest) = line.strip_prefix("BENCH ") {
                r.benches.push(rest.to_string());
            }
        }
        r
    }

    /// The first `TEST` line called `name`: (passed, detail).
    pub fn test(&self, name: &str) -> Option<(bool, &str)> {
        self.tests
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, pass, detail)| (*pass, detail.as_str()))
    }

    /// The detail of the first `TEST` line called `name`.
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.test(name).map(|(_, detail)| detail)
    }

    /// Problems that make the run unclean: failed `TEST` lines, faults, a
    /// missing `TESTS DONE` or one with fail != 0 or counts that do not match
    /// the `TEST` lines.
    pub fn problems(&self) -> Vec<String> {
        self.problems_but("")
    }

    /// [`GuestReport::problems`], except failed checks whose names start with `tolerated`
    /// (an empty prefix tolerates none), which `TESTS DONE` may count.
    fn problems_but(&self, tolerated: &str) -> Vec<String> {
        let mut p = Vec::new();
        let mut tolerated_failures = 0;
        for (name, pass, detail) in &self.tests {
            if !pass && !tolerated.is_empty() && name.starts_with(tolerated) {
                tolerated_failures += 1;
            } else if !pass {
                p.push(format!("check {name} FAILED: {detail}"));
            }
        }
        for f in &self.faults {
            p.push(format!("guest FAULT: {f}"));
        }
        match self.done {
            None => p.push("no `TESTS DONE` line (guest crashed, hung or was cut off)".to_string()),
            Some((pass, fail)) => {
                if fail != tolerated_failures {
                    p.push(format!("TESTS DONE reports fail={fail}"));
                }
                let passed = self.tests.iter().filter(|t| t.1).count();
                if usize::try_from(pass).ok() != Some(passed) {
                    p.push(format!(
                        "TESTS DONE reports pass={pass} but {passed} PASS lines were seen"
                    ));
                }
            }
        }
        p
    }

    /// Asserts that every check in `names` was reported and passed (all lines
    /// of that name, if it occurs more than once), and that the run is clean
    /// (see [`GuestReport::problems`]).
    ///
    /// # Panics
    /// With a list of the problems and the full guest output.
    pub fn assert_passed(&self, names: &[&str]) {
        self.assert_passed_but(names, "");
    }

    /// [`GuestReport::assert_passed`], tolerating failed checks whose names start with
    /// `tolerated` (a device the test breaks on purpose, e.g. `virtio.blk0.`).
    ///
    /// # Panics
    /// As [`GuestReport::assert_passed`].
    pub fn assert_passed_but(&self, names: &[&str], tolerated: &str) {
        let mut problems = Vec::new();
        for name in names {
            if !self.tests.iter().any(|(n, _, _)| n == name) {
                problems.push(format!("check {name} missing"));
            }
        }
        problems.extend(self.problems_but(tolerated));
        if !problems.is_empty() {
            let mut msg = String::from("guest report not clean:\n");
            for pr in &problems {
                let _ = writeln!(msg, "  - {pr}");
            }
            let _ = write!(
                msg,
                "----- guest output -----\n{}\n------------------------",
                self.raw.trim_end()
            );
            panic!("{msg}");
        }
    }
}

fn parse_test(rest: &str) -> TestLine {
    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    let (verdict, detail) = tail.split_once(' ').unwrap_or((tail, ""));
    match verdict {
        "PASS" => (name.to_string(), true, detail.to_string()),
        "FAIL" => (name.to_string(), false, detail.to_string()),
        _ => (
            name.to_string(),
            false,
            format!("malformed TEST line: {rest:?}"),
        ),
    }
}

fn parse_done(rest: &str) -> Option<(u32, u32)> {
    let mut pass = None;
    let mut fail = None;
    for word in rest.split_whitespace() {
        match word.split_once('=') {
            Some(("pass", v)) => pass = v.parse().ok(),
            Some(("fail", v)) => fail = v.parse().ok(),
            _ => {}
        }
    }
    Some((pass?, fail?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\x1b[2JSeaBIOS (version x)\r\nBooting from ROM..\n\
        NIMBUS-TEST-GUEST stage1\n\
        TEST pvh.magic PASS magic=0x336ec578 version=1\n\
        INFO memmap addr=0x0 size=0x9fc00\n\
        TEST cmdline PASS \"expect.cpus=1 x=y\"\r\n\
        TEST rtc FAIL no expect.now given\n\
        BENCH loop 12 ns\n\
        TESTS DONE pass=2 fail=1\n";

    #[test]
    fn parses_protocol_lines() {
        let r = GuestReport::parse(SAMPLE);
        assert_eq!(r.banner.as_deref(), Some("NIMBUS-TEST-GUEST stage1"));
        assert_eq!(r.tests.len(), 3);
        assert_eq!(
            r.test("pvh.magic"),
            Some((true, "magic=0x336ec578 version=1"))
        );
        assert_eq!(r.detail("cmdline"), Some("\"expect.cpus=1 x=y\""));
        assert_eq!(r.test("rtc"), Some((false, "no expect.now given")));
        assert_eq!(r.done, Some((2, 1)));
        assert_eq!(r.infos, vec!["memmap addr=0x0 size=0x9fc00".to_string()]);
        assert_eq!(r.benches, vec!["loop 12 ns".to_string()]);
        assert!(r.faults.is_empty());
    }

    #[test]
    fn problems_list_failures_and_counts() {
        let r = GuestReport::parse(SAMPLE);
        let p = r.problems();
        assert!(p.iter().any(|s| s.contains("rtc FAILED")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("fail=1")), "{p:?}");
        let clean = GuestReport::parse("TEST a PASS\nTESTS DONE pass=1 fail=0\n");
        assert!(clean.problems().is_empty());
        clean.assert_passed(&["a"]);
    }

    #[test]
    fn missing_done_and_faults_are_problems() {
        let r = GuestReport::parse("TEST a PASS x\nFAULT vector=0xe error=0x4 rip=0x1 cr2=0x2\n");
        let p = r.problems();
        assert!(p.iter().any(|s| s.contains("no `TESTS DONE`")), "{p:?}");
        assert_eq!(
            r.faults,
            vec!["vector=0xe error=0x4 rip=0x1 cr2=0x2".to_string()]
        );
    }

    #[test]
    #[should_panic(expected = "check b missing")]
    fn assert_passed_reports_missing_checks() {
        GuestReport::parse("TEST a PASS\nTESTS DONE pass=1 fail=0\n").assert_passed(&["a", "b"]);
    }

    #[test]
    fn malformed_lines_fail() {
        let r = GuestReport::parse("TEST weird MAYBE\nTESTS DONE pass=x\n");
        assert_eq!(r.test("weird").map(|t| t.0), Some(false));
        assert_eq!(r.done, Some((0, u32::MAX)));
    }
}
