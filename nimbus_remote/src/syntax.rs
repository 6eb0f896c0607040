//! The parts of Cloud Hypervisor's `key=value,...` syntax that `vm_config::kv` does not read:
//! values holding bracketed lists. CH splits an option only at commas outside brackets and
//! quotes, so `fd=[3,4]` is one value; its integer lists may hold ranges (`[3,5-7]`); and
//! `restore`'s `net_fds=[net0@[3,4],net1@[5]]` pairs device ids with descriptor lists.

/// A malformed option string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyntaxError {
    /// A bracket or quote is not closed (or closed without being opened).
    #[error("unbalanced brackets or quotes in '{0}'")]
    Unbalanced(String),
    /// A token without `=`.
    #[error("'{0}' is not of the form key=value")]
    NotKeyValue(String),
    /// Not a list of integers of the expected kind.
    #[error("'{value}' is not a list of {what} such as 3, [3,4] or [3-5]")]
    IntList {
        /// What the items are.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// Not a list of `id@[fds]` pairs.
    #[error("'{0}' is not a list such as [net0@[3,4],net1@[5]]")]
    IdFdList(String),
}

/// `(key, value)` pairs borrowed from an option string.
pub type Pairs<'a> = Vec<(&'a str, &'a str)>;

/// Splits `s` at the commas outside brackets and double quotes, keeping each part verbatim.
fn split_top_level(s: &str) -> Result<Vec<&str>, SyntaxError> {
    let unbalanced = || SyntaxError::Unbalanced(s.to_string());
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).ok_or_else(unbalanced)?,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return Err(unbalanced());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// The `(key, value)` pairs of `s`, values verbatim (quotes kept); empty parts are skipped.
pub fn pairs(s: &str) -> Result<Pairs<'_>, SyntaxError> {
    split_top_level(s)?
        .into_iter()
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            part.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| SyntaxError::NotKeyValue(part.to_string()))
        })
        .collect()
}

/// Rewrites the commas inside brackets as `;`, the list separator `vm_config` reads
/// (`fd=[3,4]` becomes `fd=[3;4]`), leaving top-level commas and quoted text alone.
pub fn semicolons_in_brackets(s: &str) -> Result<String, SyntaxError> {
    split_top_level(s)?;
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth > 0 => {
                out.push(';');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    Ok(out)
}

/// Splits `s` into the values of `keys` (in the order given in `s`) and the other pairs,
/// rejoined as an option string for `vm_config::kv`.
pub fn take_keys<'a>(s: &'a str, keys: &[&str]) -> Result<(Pairs<'a>, String), SyntaxError> {
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    for (key, value) in pairs(s)? {
        if keys.contains(&key) {
            taken.push((key, value));
        } else {
            rest.push(format!("{key}={value}"));
        }
    }
    Ok((taken, rest.join(",")))
}

/// Longest list a range may expand to (a typo such as `[3-3000000000]` must not exhaust memory).
const MAX_LIST: usize = 4096;

/// Reads an integer list as CH writes them: `3`, `[3,4]` or `[3-5,7]` (ranges inclusive);
/// `what` names the items in the error.
pub fn int_list<T: TryFrom<u64>>(value: &str, what: &'static str) -> Result<Vec<T>, SyntaxError> {
    let bad = || SyntaxError::IntList {
        what,
        value: value.to_string(),
    };
    let trimmed = value.trim();
    let inner = match trimmed.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or_else(bad)?,
        None => trimmed,
    };
    let number = |t: &str| t.trim().parse::<u64>().ok();
    let item = |n: u64| T::try_from(n).map_err(|_| bad());
    let mut list = Vec::new();
    for part in inner.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = number(first).zip(number(last)).ok_or_else(bad)?;
                let count = last.checked_sub(first).ok_or_else(bad)?;
                if count >= (MAX_LIST - list.len()) as u64 {
                    return Err(bad());
                }
                for n in first..=last {
                    list.push(item(n)?);
                }
            }
            None => list.push(item(number(part).ok_or_else(bad)?)?),
        }
        if list.len() > MAX_LIST {
            return Err(bad());
        }
    }
    Ok(list)
}

/// Reads a descriptor list (`3`, `[3,4]`, `[3-5]`).
pub fn fd_list(value: &str) -> Result<Vec<i32>, SyntaxError> {
    int_list(value, "file descriptors")
}

/// Reads `[id@[fds],id@fd,...]`, the form of `restore`'s `net_fds`.
pub fn id_fd_list(value: &str) -> Result<Vec<(String, Vec<i32>)>, SyntaxError> {
    let bad = || SyntaxError::IdFdList(value.to_string());
    let inner = value
        .trim()
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(bad)?;
    split_top_level(inner)?
        .into_iter()
        .map(|item| {
            let (id, fds) = item.split_once('@').ok_or_else(bad)?;
            let id = id.trim().trim_matches('"');
            if id.is_empty() {
                return Err(bad());
            }
            Ok((id.to_string(), fd_list(fds)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_inside_brackets_and_quotes_do_not_split() {
        assert_eq!(
            pairs("tap=t0,fd=[3,4],mac=\"a,b\",").expect("pairs"),
            vec![("tap", "t0"), ("fd", "[3,4]"), ("mac", "\"a,b\"")]
        );
        assert_eq!(
            pairs("fd=[3,4"),
            Err(SyntaxError::Unbalanced("fd=[3,4".into()))
        );
        assert!(pairs("fd=3]").is_err());
        assert_eq!(pairs("tap"), Err(SyntaxError::NotKeyValue("tap".into())));
    }

    #[test]
    fn bracket_commas_become_semicolons() {
        assert_eq!(
            semicolons_in_brackets("fd=[3,4],num_queues=4,tap=\"[x,y]\"").expect("rewrite"),
            "fd=[3;4],num_queues=4,tap=\"[x,y]\""
        );
    }

    #[test]
    fn descriptor_lists() {
        assert_eq!(fd_list("3"), Ok(vec![3]));
        assert_eq!(fd_list("[3,4]"), Ok(vec![3, 4]));
        assert_eq!(fd_list("[3-5,9]"), Ok(vec![3, 4, 5, 9]));
        for bad in [
            "",
            "[]",
            "[3",
            "x",
            "[-1]",
            "[5-3]",
            "[3,]",
            "[0-99999999999]",
        ] {
            assert!(fd_list(bad).is_err(), "{bad}");
        }
        assert_eq!(int_list::<u16>("[256,1024]", "sizes"), Ok(vec![256, 1024]));
        assert!(int_list::<u16>("[65536]", "sizes").is_err());
    }

    #[test]
    fn id_descriptor_lists() {
        assert_eq!(
            id_fd_list("[net0@[3,4],net1@5]"),
            Ok(vec![("net0".into(), vec![3, 4]), ("net1".into(), vec![5])])
        );
        for bad in ["net0@3", "[net0]", "[@3]", "[net0@[3,x]]"] {
            assert!(id_fd_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_taken_out_and_the_rest_rejoined() {
        let (taken, rest) = take_keys(
            "source_url=file:///s,net_fds=[a@[3,4]],prefault=on",
            &["net_fds"],
        )
        .expect("take");
        assert_eq!(taken, vec![("net_fds", "[a@[3,4]]")]);
        assert_eq!(rest, "source_url=file:///s,prefault=on");
    }
}
