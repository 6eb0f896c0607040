//! The documentation against the code, without KVM:
//!
//! * every relative link in `README.md` and `docs/*.md` resolves to a file inside the repository
//!   (and a `#anchor` to a heading of the file it points to); absolute URLs are not followed;
//! * for every option, the `key=` names `nimbus --help` shows, the ones docs/cli.md shows and
//!   the ones the command-line parser accepts are the same set. The accepted keys are found by
//!   asking the real parser about every field (and alias) of the option's configuration struct,
//!   so a field added to a struct fails here until `--help` and docs/cli.md describe it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Instant;

use clap::Parser as _;
use serde::de::{self, Visitor};
use vm_config::{
    BalloonConfig, ConsoleConfig, CpusConfig, DebugConsoleConfig, DiskConfig, FsConfig,
    LandlockConfig, MemoryConfig, NetConfig, PciSegmentConfig, PlatformConfig, PmemConfig,
    RngConfig, VsockConfig,
};
use vmm::api::ApiServerError;
use vmm::cli::Cli;
use vmm::events::{EventMonitor, EventMonitorError};

fn repo_root() -> PathBuf {
    let vmm = Path::new(env!("CARGO_MANIFEST_DIR"));
    vmm.parent()
        .map_or_else(|| vmm.to_path_buf(), Path::to_path_buf)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README.md and every `.md` file in docs/.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let docs = root.join("docs");
    let entries = std::fs::read_dir(&docs).unwrap_or_else(|e| panic!("{}: {e}", docs.display()));
    let mut md: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    md.sort();
    files.extend(md);
    files
}

// ---------------------------------------------------------------------------------------------
// Markdown: prose lines, links, heading anchors.
// ---------------------------------------------------------------------------------------------

/// The lines of `text` outside fenced code blocks, with their line numbers (from 1).
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| t.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m => fence = None,
            (None, None) => lines.push((i + 1, line)),
            _ => {}
        }
    }
    lines
}

/// `line` without its inline code spans (a link inside backticks is not a link).
fn without_code_spans(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

/// The link targets of one prose line: inline links and images `[text](target "title")` and
/// reference definitions `[label]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut targets = Vec::new();
    let definition = line
        .trim_start()
        .strip_prefix('[')
        .and_then(|t| t.split_once("]:"))
        .filter(|(label, _)| !label.is_empty() && !label.contains(['[', ']']));
    if let Some(target) = definition.and_then(|(_, rest)| rest.split_whitespace().next()) {
        targets.push(target.trim_matches(['<', '>']).to_string());
    }
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = i;
                    break;
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let inner = after[..end].trim();
        let target = match inner.strip_prefix('<') {
            Some(t) => t.split('>').next().unwrap_or(""),
            None => inner.split_whitespace().next().unwrap_or(""),
        };
        targets.push(target.to_string());
        rest = &after[end.min(after.len())..];
    }
    targets
}

/// GitHub's anchor for a heading: markup removed, lower case, every character other than a
/// letter, digit, `-` or `_` dropped, spaces turned into `-`.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // [text](url) -> text
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    text.trim()
        .chars()
        .flat_map(char::to_lowercase)
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors a markdown file defines: one per heading (a repeated heading gets `-1`, `-2`,
/// ... as on GitHub), and `<a name="...">` / `<a id="...">`.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut set = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let t = line.trim_start();
        let level = t.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&level) && t[level..].starts_with(' ') {
            let title = t[level..].trim().trim_end_matches('#').trim();
            let base = slug(title);
            let n = seen.entry(base.clone()).or_insert(0);
            set.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        for attr in ["<a name=\"", "<a id=\""] {
            let mut rest = line;
            while let Some(at) = rest.find(attr) {
                rest = &rest[at + attr.len()..];
                if let Some(end) = rest.find('"') {
                    set.insert(rest[..end].to_string());
                }
            }
        }
    }
    set
}

/// Whether `target` names a scheme (`https:`, `mailto:`, ...): not a path in the repository.
fn is_absolute_url(target: &str) -> bool {
    let scheme: String = target.chars().take_while(|&c| c != ':').collect();
    scheme.len() < target.len()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
}

/// `%XX` escapes decoded (a link to a file with a space is written `a%20b.md`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `base.join(rel)` with `.` and `..` resolved without looking at the file system; `None` when
/// `..` climbs above the file system root.
fn normalize(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// The problems of the links in markdown file `file` (text `text`) of the repository at `root`.
fn link_problems(root: &Path, file: &Path, text: &str) -> Vec<String> {
    let name = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let dir = file.parent().unwrap_or(root);
    let own_anchors = anchors(text);
    let mut problems = Vec::new();
    for (n, line) in prose_lines(text) {
        for target in link_targets(line) {
            let at = format!("{name}:{n}: link ({target})");
            if target.is_empty() {
                problems.push(format!("{at}: empty target"));
                continue;
            }
            if is_absolute_url(&target) {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            if path.is_empty() {
                if let Some(a) = anchor.filter(|a| !own_anchors.contains(*a)) {
                    problems.push(format!("{at}: no heading #{a} in {name}"));
                }
                continue;
            }
            let path = percent_decode(path);
            let resolved = match path.strip_prefix('/') {
                Some(from_root) => normalize(root, from_root),
                None => normalize(dir, &path),
            };
            let Some(resolved) = resolved.filter(|p| p.starts_with(root)) else {
                problems.push(format!("{at}: points outside the repository"));
                continue;
            };
            let inside = resolved
                .canonicalize()
                .ok()
                .zip(root.canonicalize().ok())
                .is_some_and(|(p, r)| p.starts_with(r));
            if !resolved.exists() {
                problems.push(format!("{at}: {} does not exist", resolved.display()));
                continue;
            }
            if !inside {
                problems.push(format!(
                    "{at}: resolves (through a link) outside the repository"
                ));
                continue;
            }
            let Some(anchor) = anchor.filter(|a| !a.is_empty()) else {
                continue;
            };
            if resolved.extension().is_some_and(|x| x == "md")
                && !anchors(&read(&resolved)).contains(anchor)
            {
                problems.push(format!(
                    "{at}: no heading #{anchor} in {}",
                    resolved.strip_prefix(root).unwrap_or(&resolved).display()
                ));
            }
        }
    }
    problems
}

#[test]
fn relative_links_resolve_inside_the_repository() {
    let root = repo_root();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files(&root) {
        let text = read(&file);
        checked += prose_lines(&text)
            .iter()
            .map(|(_, l)| link_targets(l).len())
            .sum::<usize>();
        problems.extend(link_problems(&root, &file, &text));
    }
    assert!(
        checked > 10,
        "only {checked} links found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_link_checker_finds_what_it_should() {
    let root = repo_root();
    let file = root.join("docs").join("example.md");
    let text = "# A `code` heading\n\
        ok: [cli](cli.md), [keys](cli.md#--disk), [here](#a-code-heading), [web](https://x.org/a)\n\
        [up](../README.md#nimbus) ![img](../README.md \"title\")\n\
        `[not a link](nowhere.md)`\n\
        ```\n[in a block](nowhere.md)\n```\n\
        bad: [missing](nope.md) [outside](../../shared/docs/style.md) [anchor](cli.md#nope)\n\
        [self](#nope) [escape](../../../../../../../../../../etc/passwd)\n\
        [ref]: ../../outside.md\n";
    let problems = link_problems(&root, &file, text);
    let expected = [
        "nope.md does not exist",
        "(../../shared/docs/style.md): points outside",
        "no heading #nope in docs/cli.md",
        "(#nope): no heading #nope in docs/example.md",
        "(../../../../../../../../../../etc/passwd): points outside",
        "(../../outside.md): points outside",
    ];
    for e in expected {
        assert!(
            problems.iter().any(|p| p.contains(e)),
            "{e:?} not reported in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    assert_eq!(slug("`--serial` and `--console`"), "--serial-and---console");
    assert_eq!(slug("Why a [test](x.md) guest?"), "why-a-test-guest");
}

// ---------------------------------------------------------------------------------------------
// Option keys: `nimbus --help`, docs/cli.md and the parser.
// ---------------------------------------------------------------------------------------------

/// The `key=` names in one word: runs of `[a-z0-9_]` starting with a letter, right before `=`
/// and not after `.` or `-` (so `1..=254`, `<=` and `blk.pattern.sector=` are not keys).
fn keys_in(word: &str) -> Vec<String> {
    let b = word.as_bytes();
    let ident = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_';
    let mut keys = Vec::new();
    for (eq, _) in word.match_indices('=') {
        let start = (0..eq).rev().take_while(|&i| ident(b[i])).last();
        let Some(start) = start else { continue };
        let after_punct = start > 0 && matches!(b[start - 1], b'.' | b'-');
        if b[start].is_ascii_lowercase() && !after_punct {
            keys.push(word[start..eq].to_string());
        }
    }
    keys
}

/// `key=` names in `text`, by option: a word right after a word `--other` belongs to
/// `--other` (as in "needs `--memory shared=on`"), every other word to `own`.
fn attributed_keys(text: &str, own: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pending: Option<String> = None;
    for word in text.split_whitespace() {
        let clean = word.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-'));
        if clean
            .strip_prefix("--")
            .is_some_and(|name| name.starts_with(|c: char| c.is_ascii_lowercase()))
        {
            pending = Some(clean.to_string());
            continue;
        }
        let owner = pending.take().unwrap_or_else(|| own.to_string());
        keys.entry(owner).or_default().extend(keys_in(word));
    }
    keys
}

/// The canonical name of an option among the names one place gives it (`-V`, `--version`):
/// the long one if there is one.
fn canonical(names: &[String]) -> Option<String> {
    names
        .iter()
        .find(|n| n.starts_with("--"))
        .or_else(|| names.first())
        .cloned()
}

/// `nimbus --help`, cut into one text per option (its header line and its help).
fn help_sections() -> BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .arg("--help")
        .output()
        .expect("run nimbus --help");
    assert!(out.status.success(), "nimbus --help: {:?}", out.status);
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut sections: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        if (1..=6).contains(&indent) && line.trim_start().starts_with('-') {
            let names: Vec<String> = line
                .split(|c: char| c == ',' || c.is_whitespace())
                .take_while(|w| !w.starts_with('<'))
                .filter(|w| w.starts_with('-'))
                .map(|w| w.trim_end_matches('.').to_string())
                .collect();
            current = canonical(&names);
        }
        if let Some(option) = &current {
            let text = sections.entry(option.clone()).or_default();
            text.push_str(line);
            text.push('\n');
        }
    }
    sections
}

/// The option names (`--disk`, `-v`) in the code spans of `cell`.
fn options_in(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| span.split_whitespace().next())
        .filter(|w| w.starts_with('-'))
        .map(str::to_string)
        .collect()
}

/// docs/cli.md, cut into one text per option: its rows in the options table (a row whose first
/// cell starts with the option) and the section whose heading names it (`### \`--disk\``).
fn docs_sections(md: &str) -> BTreeMap<String, String> {
    let mut sections: BTreeMap<String, String> = BTreeMap::new();
    let mut heading_options: Vec<String> = Vec::new();
    for (_, line) in prose_lines(md) {
        let t = line.trim_start();
        if t.starts_with('#') {
            heading_options = options_in(t);
            continue;
        }
        let mut owners = heading_options.clone();
        if let Some(cell) = t.strip_prefix('|').and_then(|r| r.split(" | ").next()) {
            if cell.trim_start().starts_with("`-") {
                let mut names = options_in(cell);
                names.dedup();
                owners.extend(canonical(&names));
            }
        }
        for option in owners {
            let text = sections.entry(option).or_default();
            text.push_str(line);
            text.push('\n');
        }
    }
    sections
}

/// The names serde accepts for the fields of `T` (aliases included): what its derived
/// `Deserialize` hands to `deserialize_struct`.
fn struct_fields<T: de::DeserializeOwned>() -> BTreeSet<String> {
    struct Probe<'a>(&'a mut Vec<&'static str>);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.extend_from_slice(fields);
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Probe(&mut fields));
    assert!(
        !fields.is_empty(),
        "{}: no fields",
        std::any::type_name::<T>()
    );
    fields.into_iter().map(str::to_string).collect()
}

/// Whether an error (or one of its causes) says a key is unknown.
fn says_unknown_key(e: &dyn std::error::Error) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.to_string().contains("unknown key") {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether `nimbus <option> <base,>key=1` gets past the parser's unknown-key check (a bad value
/// for a known key is another error).
fn vm_option_accepts(option: &str, base: &str, key: &str) -> bool {
    let value = if base.is_empty() {
        format!("{key}=1")
    } else {
        format!("{base},{key}=1")
    };
    let cli = Cli::try_parse_from(["nimbus", option, &value])
        .unwrap_or_else(|e| panic!("nimbus {option} {value}: {e}"));
    match cli.vm_config() {
        Ok(_) => true,
        Err(e) => !says_unknown_key(&e),
    }
}

/// Whether `--api-socket key=...` is more than a syntax error (a path that cannot be bound, a
/// descriptor that is not a listening socket: nothing is created).
fn api_socket_accepts(key: &str) -> bool {
    let (tx, _rx) = mpsc::channel();
    // The path first: `path=1` would bind a socket in the current directory.
    ["/nonexistent-nimbus-docs-test/api.sock", "1"]
        .iter()
        .any(
            |v| match vmm::api::serve(&format!("{key}={v}"), tx.clone()) {
                Ok(server) => {
                    server.stop();
                    true
                }
                Err(ApiServerError::Syntax(_)) => false,
                Err(_) => true,
            },
        )
}

/// Whether `--event-monitor key=...` is more than a syntax error (nothing is created).
fn event_monitor_accepts(key: &str) -> bool {
    // The path first: `path=1` would create a file in the current directory.
    ["/nonexistent-nimbus-docs-test/events", "1"]
        .iter()
        .any(|v| {
            !matches!(
                EventMonitor::open(&format!("{key}={v}"), Instant::now()),
                Err(EventMonitorError::Syntax(_))
            )
        })
}

/// The keys `option` accepts: every candidate (the fields and aliases of its configuration
/// struct, the keys the command line adds, and whatever `--help` and docs/cli.md name) that
/// the real parser does not call unknown. Options without keys give the empty set; an option
/// this test does not know fails, so a new option gets a line here.
fn accepted_keys(option: &str, named: &BTreeSet<String>) -> BTreeSet<String> {
    let vm = |base: &str, fields: BTreeSet<String>, extra: &[&str]| {
        let accepts = |k: &str| vm_option_accepts(option, base, k);
        assert!(
            !accepts("no_such_key"),
            "{option}: the probe accepts anything"
        );
        let candidates = fields
            .into_iter()
            .chain(extra.iter().map(|k| k.to_string()))
            .chain(named.iter().cloned());
        candidates.filter(|k| accepts(k)).collect()
    };
    let by = |accepts: fn(&str) -> bool, extra: &[&str]| {
        assert!(
            !accepts("no_such_key"),
            "{option}: the probe accepts anything"
        );
        let candidates = extra
            .iter()
            .map(|k| k.to_string())
            .chain(named.iter().cloned());
        candidates.filter(|k| accepts(k)).collect()
    };
    match option {
        "--cpus" => vm("", struct_fields::<CpusConfig>(), &[]),
        "--memory" => vm("", struct_fields::<MemoryConfig>(), &[]),
        "--disk" => vm("", struct_fields::<DiskConfig>(), &[]),
        // `fd` is the command line's spelling of the descriptors (NetConfig::parse).
        "--net" => vm("", struct_fields::<NetConfig>(), &["fd"]),
        "--fs" => vm("tag=t,socket=/s", struct_fields::<FsConfig>(), &[]),
        "--pmem" => vm("file=/p", struct_fields::<PmemConfig>(), &[]),
        "--balloon" => vm("size=0", struct_fields::<BalloonConfig>(), &[]),
        "--rng" => vm("", struct_fields::<RngConfig>(), &[]),
        "--vsock" => vm("cid=3,socket=/v", struct_fields::<VsockConfig>(), &[]),
        "--serial" | "--console" => vm("", struct_fields::<ConsoleConfig>(), &[]),
        "--debug-console" => vm("", struct_fields::<DebugConsoleConfig>(), &[]),
        "--landlock-rules" => vm("path=/p,access=r", struct_fields::<LandlockConfig>(), &[]),
        "--platform" => vm("", struct_fields::<PlatformConfig>(), &[]),
        "--pci-segment" => vm("pci_segment=0", struct_fields::<PciSegmentConfig>(), &[]),
        "--api-socket" => by(api_socket_accepts, &["path", "fd"]),
        "--event-monitor" => by(event_monitor_accepts, &["path", "fd"]),
        "--kernel" | "--initramfs" | "--cmdline" | "--seccomp" | "--landlock" | "-v"
        | "--log-file" | "--version" | "--help" => BTreeSet::new(),
        other => panic!("{other} is new: tell accepted_keys where its keys come from"),
    }
}

fn difference(what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>) -> Option<String> {
    let d: Vec<&str> = a.difference(b).map(String::as_str).collect();
    (!d.is_empty()).then(|| format!("{what}: {}", d.join(", ")))
}

#[test]
fn help_docs_and_parser_name_the_same_keys() {
    let help = help_sections();
    let docs = docs_sections(&read(&repo_root().join("docs").join("cli.md")));
    let help_options: BTreeSet<&String> = help.keys().collect();
    let docs_options: BTreeSet<&String> = docs.keys().collect();
    assert_eq!(
        help_options, docs_options,
        "`nimbus --help` and docs/cli.md list different options"
    );
    assert!(help.len() >= 18, "only {:?} in --help", help.keys());

    let mut named: BTreeMap<String, [BTreeSet<String>; 2]> = BTreeMap::new();
    for (i, sections) in [&help, &docs].into_iter().enumerate() {
        for (option, text) in sections {
            for (owner, keys) in attributed_keys(text, option) {
                named.entry(owner).or_default()[i].extend(keys);
            }
        }
    }
    let own = |sections: &BTreeMap<String, String>, option: &str| {
        let text = sections.get(option).map_or("", String::as_str);
        attributed_keys(text, option)
            .remove(option)
            .unwrap_or_default()
    };
    let mut problems = Vec::new();
    for (option, [in_help, in_docs]) in &named {
        let all: BTreeSet<String> = in_help.union(in_docs).cloned().collect();
        let accepted = accepted_keys(option, &all);
        let (h, d) = (own(&help, option), own(&docs, option));
        // Keys named with another option ("needs `--memory shared=on`") must exist there.
        let elsewhere: BTreeSet<String> = all.difference(&h).cloned().collect();
        let elsewhere: BTreeSet<String> = elsewhere.difference(&d).cloned().collect();
        problems.extend(
            [
                difference("in --help, not accepted", &h, &accepted),
                difference("accepted, not in --help", &accepted, &h),
                difference("in docs/cli.md, not accepted", &d, &accepted),
                difference("accepted, not in docs/cli.md", &accepted, &d),
                difference(
                    "named with another option, not accepted",
                    &elsewhere,
                    &accepted,
                ),
            ]
            .into_iter()
            .flatten()
            .map(|p| format!("{option}: {p}")),
        );
    }
    assert!(
        problems.is_empty(),
        "option keys differ:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn keys_are_found_and_attributed() {
    assert_eq!(keys_in("[,num_queues=N][,fd=[3,4]]"), ["num_queues", "fd"]);
    assert!(keys_in("1..=254 <=1024 blk.pattern.sector=8 SIZE=1 --x=y").is_empty());
    let k = attributed_keys(
        "`--disk path=PATH[,serial=S]` needs `--memory shared=on`; readonly=on (see --fs)",
        "--disk",
    );
    let names = |o: &str| k.get(o).map(|s| s.iter().cloned().collect::<Vec<_>>());
    assert_eq!(
        names("--disk"),
        Some(vec!["path".into(), "readonly".into(), "serial".into()])
    );
    assert_eq!(names("--memory"), Some(vec!["shared".into()]));
    let fields = struct_fields::<NetConfig>();
    assert!(
        fields.contains("vhost_socket") && fields.contains("socket"),
        "{fields:?}"
    );
    assert!(vm_option_accepts("--net", "", "fd"));
    assert!(
        !vm_option_accepts("--net", "", "fds"),
        "the JSON name is not a CLI key"
    );
    assert!(vm_option_accepts("--serial", "", "file"));
    assert!(!vm_option_accepts("--serial", "", "mode"));
    assert!(api_socket_accepts("fd") && !api_socket_accepts("socket"));
    assert!(event_monitor_accepts("path") && !event_monitor_accepts("file"));
}
