//! The daemons' `key=value,...` option values (Cloud Hypervisor's syntax): splitting, key
//! checks and the one error type; each daemon turns the values into its own configuration.

/// Errors in a `key=value,...` option value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A comma-separated item without `=`.
    #[error("'{0}' is not of the form key=value")]
    NotKeyValue(String),
    /// A double quote that is never closed.
    #[error("unterminated quote in '{0}'")]
    UnterminatedQuote(String),
    /// A key the option does not have.
    #[error("unknown key '{key}' (known: {known})")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The option's keys, comma-separated.
        known: String,
    },
    /// A key given twice.
    #[error("key '{0}' is given more than once")]
    DuplicateKey(String),
    /// A required key is absent.
    #[error("'{0}=' is required")]
    Missing(&'static str),
    /// A value the key does not accept.
    #[error("{key}={value}: expected {expected}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What the key accepts.
        expected: &'static str,
    },
}

/// One `key=value` item, its key checked against the option's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The key, as listed in the option's key table.
    pub key: &'static str,
    /// The value, quotes removed.
    pub value: String,
}

impl Item {
    /// The error for this item's value, which should have been `expected`.
    pub fn invalid(&self, expected: &'static str) -> OptionError {
        OptionError::InvalidValue {
            key: self.key,
            value: self.value.clone(),
            expected,
        }
    }

    /// The value as `on`/`true` or `off`/`false` (Cloud Hypervisor's toggle spellings).
    ///
    /// # Errors
    ///
    /// [`OptionError::InvalidValue`] for anything else.
    pub fn toggle(&self) -> Result<bool, OptionError> {
        match self.value.as_str() {
            "true" | "on" => Ok(true),
            "false" | "off" => Ok(false),
            _ => Err(self.invalid("true or false (on or off)")),
        }
    }

    /// The value as a number accepted by `ok`, else [`OptionError::InvalidValue`] naming
    /// `expected`.
    ///
    /// # Errors
    ///
    /// As above.
    pub fn number<T: std::str::FromStr>(
        &self,
        ok: impl Fn(&T) -> bool,
        expected: &'static str,
    ) -> Result<T, OptionError> {
        self.value
            .parse()
            .ok()
            .filter(|n| ok(n))
            .ok_or_else(|| self.invalid(expected))
    }
}

/// Splits `input` into its items, in order: at commas outside double quotes (the quotes are
/// dropped, so `path="/a,b.img"` names `/a,b.img`), empty items skipped, each item
/// `key=value` with a key of `keys` (the option's key table: key and help line) given once.
///
/// # Errors
///
/// An [`OptionError`] naming the offending item or key.
///
/// # Example
///
/// ```
/// use vhost_user_daemon::options::{items, OptionError};
///
/// const KEYS: &[(&str, &str)] = &[("path", "image"), ("readonly", "no writes")];
/// let got = items("path=\"/a,b\",readonly=on", KEYS).unwrap();
/// assert_eq!((got[0].key, got[0].value.as_str()), ("path", "/a,b"));
/// assert_eq!(got[1].toggle(), Ok(true));
/// assert!(matches!(items("colour=red", KEYS), Err(OptionError::UnknownKey { .. })));
/// ```
pub fn items(input: &str, keys: &[(&'static str, &str)]) -> Result<Vec<Item>, OptionError> {
    let mut pieces = vec![String::new()];
    let mut quoted = false;
    for c in input.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => pieces.push(String::new()),
            c => {
                if let Some(last) = pieces.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    if quoted {
        return Err(OptionError::UnterminatedQuote(input.to_string()));
    }
    let mut out: Vec<Item> = Vec::new();
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        let (key, value) = piece
            .split_once('=')
            .ok_or_else(|| OptionError::NotKeyValue(piece.clone()))?;
        let Some(&(key, _)) = keys.iter().find(|(k, _)| *k == key) else {
            return Err(OptionError::UnknownKey {
                key: key.to_string(),
                known: keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
            });
        };
        if out.iter().any(|i| i.key == key) {
            return Err(OptionError::DuplicateKey(key.to_string()));
        }
        out.push(Item {
            key,
            value: value.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEYS: &[(&str, &str)] = &[("a", ""), ("b", ""), ("n", "")];

    #[test]
    fn splitting_and_errors() {
        let got = items(",a=1,,b=\"x,y=z\",", KEYS).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].value, "x,y=z");
        assert_eq!(
            items("a=1,a=2", KEYS),
            Err(OptionError::DuplicateKey("a".into()))
        );
        assert_eq!(items("a", KEYS), Err(OptionError::NotKeyValue("a".into())));
        assert_eq!(
            items("a=\"1", KEYS),
            Err(OptionError::UnterminatedQuote("a=\"1".into()))
        );
        assert_eq!(
            items("c=1", KEYS).unwrap_err().to_string(),
            "unknown key 'c' (known: a, b, n)"
        );
        assert_eq!(items("", KEYS), Ok(Vec::new()));
    }

    #[test]
    fn values() {
        let got = items("a=on,b=off,n=17", KEYS).unwrap();
        assert_eq!(got[0].toggle(), Ok(true));
        assert_eq!(got[1].toggle(), Ok(false));
        assert!(got[2].toggle().is_err());
        assert_eq!(got[2].number(|n: &u16| *n < 20, "below 20"), Ok(17));
        assert_eq!(
            got[2]
                .number(|n: &u16| *n < 10, "below 10")
                .unwrap_err()
                .to_string(),
            "n=17: expected below 10"
        );
    }
}
