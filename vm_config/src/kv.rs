//! A serde deserializer for Cloud Hypervisor's option syntax, `key=value,key=value`.
//!
//! It lets the CLI fill the same typed structs the API deserializes from JSON: each option's
//! keys are declared once, as fields of its config struct (CLI spellings via `#[serde(alias)]`).
//! Values are strings parsed on demand into the field's type; `on`/`off` are booleans; a value
//! may be double-quoted to contain commas.

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

/// Errors parsing an option string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// A token without `=`.
    #[error("'{0}' is not of the form key=value")]
    NotKeyValue(String),
    /// A quote that is never closed.
    #[error("unterminated quote in '{0}'")]
    UnterminatedQuote(String),
    /// A bracket that is never closed, or closed without being opened.
    #[error("unbalanced brackets in '{0}'")]
    Unbalanced(String),
    /// Not a list of integers of the expected kind.
    #[error("'{value}' is not a list of {what} such as 3, [3,4] or [3-5]")]
    IntList {
        /// What the items are.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// Not a list of `id@[numbers]` pairs.
    #[error("'{value}' is not a list such as {example}")]
    TupleList {
        /// The value given.
        value: String,
        /// The form expected.
        example: &'static str,
    },
    /// Keys the option does not have.
    #[error("unknown key(s): {keys} (allowed: {allowed})")]
    UnknownKeys {
        /// The keys given that the option does not have.
        keys: String,
        /// The keys it has.
        allowed: String,
    },
    /// Rejected by the target type.
    #[error("{0}")]
    Invalid(String),
    /// A key's value was rejected.
    #[error("{key}={value}: {message}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl de::Error for KvError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        KvError::Invalid(msg.to_string())
    }
}

/// Splits `input` into `(key, value)` pairs at the commas outside double quotes and brackets
/// (so `fd=[3,4]` is one value); quotes are removed, brackets kept.
pub fn split(input: &str) -> Result<Vec<(String, String)>, KvError> {
    let mut pairs = Vec::new();
    for t in tokens(input)? {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| KvError::NotKeyValue(t.clone()))?;
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// Splits `input` at the commas outside double quotes and brackets into its non-empty tokens
/// (`key=value` or a bare word such as `pty`); quotes are removed, brackets kept.
pub fn tokens(input: &str) -> Result<Vec<String>, KvError> {
    let mut token = String::new();
    let mut quoted = false;
    let mut depth = 0usize;
    let mut tokens = Vec::new();
    for c in input.chars() {
        match c {
            '"' => quoted = !quoted,
            '[' if !quoted => {
                depth += 1;
                token.push(c);
            }
            ']' if !quoted => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| KvError::Unbalanced(input.to_string()))?;
                token.push(c);
            }
            ',' if !quoted && depth == 0 => tokens.push(std::mem::take(&mut token)),
            c => token.push(c),
        }
    }
    if quoted {
        return Err(KvError::UnterminatedQuote(input.to_string()));
    }
    if depth != 0 {
        return Err(KvError::Unbalanced(input.to_string()));
    }
    tokens.push(token);
    Ok(tokens.into_iter().filter(|t| !t.is_empty()).collect())
}

/// Longest list a range may expand to (a typo such as `[3-3000000000]` must not exhaust memory).
const MAX_LIST: usize = 4096;

/// Reads an integer list as Cloud Hypervisor writes them: `3`, `[3,4]` or `[3-5,7]` (ranges
/// inclusive); `what` names the items in the error.
pub fn int_list<T: TryFrom<u64>>(value: &str, what: &'static str) -> Result<Vec<T>, KvError> {
    let bad = || KvError::IntList {
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

/// Reads `[id@[fds],id@fd,...]`, the form of `restore`'s `net_fds`.
pub fn id_fd_list(value: &str) -> Result<Vec<(String, Vec<i32>)>, KvError> {
    tuple_list(value, "file descriptors", "[net0@[3,4],net1@[5]]")
}

/// Reads Cloud Hypervisor's tuple lists, `[a@[1,2],b@3,...]`: names, each with an integer
/// list (`what` names the integers, `example` shows the form in errors).
pub fn tuple_list<T: TryFrom<u64>>(
    value: &str,
    what: &'static str,
    example: &'static str,
) -> Result<Vec<(String, Vec<T>)>, KvError> {
    let bad = || KvError::TupleList {
        value: value.to_string(),
        example,
    };
    let inner = value
        .trim()
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(bad)?;
    let items = split(&inner.replace('@', "="))?;
    if items.is_empty() {
        return Err(bad());
    }
    items
        .into_iter()
        .map(|(id, list)| {
            if id.is_empty() {
                return Err(bad());
            }
            Ok((id, int_list(&list, what)?))
        })
        .collect()
}

/// Splits `input` into the pairs whose keys are in `keys` (in the order given) and the other
/// pairs, rejoined as an option string for [`from_str`].
pub fn take_keys(input: &str, keys: &[&str]) -> Result<(Vec<(String, String)>, String), KvError> {
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    for (key, value) in split(input)? {
        if keys.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            rest.push(format!("{key}=\"{value}\""));
        }
    }
    Ok((taken, rest.join(",")))
}

/// Deserializes `T` from `key=value,...`. Unlike JSON (where unknown fields are ignored for
/// compatibility), a key the option does not have is an error: it is a user's typo.
/// An empty value means the key is unset (`tap=,mac=` as in Cloud Hypervisor's own examples),
/// so the field takes its default, or is reported missing when it has none.
pub fn from_str<T: DeserializeOwned>(input: &str) -> Result<T, KvError> {
    let mut pairs = split(input)?;
    pairs.retain(|(_, v)| !v.is_empty());
    let map = Pairs {
        pairs: pairs.into_iter(),
        current: None,
    };
    let mut unknown = Vec::new();
    let value = serde_ignored::deserialize(map, |path| unknown.push(path.to_string()))?;
    if !unknown.is_empty() {
        return Err(KvError::UnknownKeys {
            keys: unknown.join(", "),
            allowed: keys_of::<T>().join(", "),
        });
    }
    Ok(value)
}

/// The keys (field names and aliases) a configuration struct takes, as serde lists them.
pub fn keys_of<T: DeserializeOwned>() -> Vec<&'static str> {
    /// Hands the field list serde gives `deserialize_struct` back as the error.
    struct Probe;
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);
    impl std::fmt::Display for Fields {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("fields")
        }
    }
    impl std::error::Error for Fields {}
    impl de::Error for Fields {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Fields(&[])
        }
    }
    impl<'de> de::Deserializer<'de> for Probe {
        type Error = Fields;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(Fields(fields)) => fields.to_vec(),
        Ok(_) => Vec::new(),
    }
}

/// The pairs of an option as a map whose value errors name their key and value.
struct Pairs {
    pairs: std::vec::IntoIter<(String, String)>,
    current: Option<(String, String)>,
}

impl<'de> de::Deserializer<'de> for Pairs {
    type Error = KvError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KvError> {
        visitor.visit_map(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de> de::MapAccess<'de> for Pairs {
    type Error = KvError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, KvError> {
        let Some((key, value)) = self.pairs.next() else {
            return Ok(None);
        };
        let k = seed.deserialize(key.clone().into_deserializer())?;
        self.current = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, KvError> {
        let (key, value) = self.current.take().unwrap_or_default();
        seed.deserialize(Value(value.clone())).map_err(|e| match e {
            KvError::Invalid(message) => KvError::BadValue {
                key,
                value,
                message,
            },
            other => other,
        })
    }
}

/// One option value: a string that becomes whatever the target field wants.
#[derive(Debug)]
pub struct Value(pub String);

impl<'de> IntoDeserializer<'de, KvError> for Value {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! parse_number {
    ($($method:ident => $visit:ident: $ty:ty),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KvError> {
            let v: $ty = parse_int(&self.0, <$ty>::MIN, <$ty>::MAX)?;
            visitor.$visit(v)
        }
    )*};
}

fn parse_int<T: TryFrom<u64> + std::str::FromStr + std::fmt::Display>(
    s: &str,
    min: T,
    max: T,
) -> Result<T, KvError> {
    let s = s.trim();
    let parsed = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
            .ok()
            .and_then(|v| T::try_from(v).ok())
    } else {
        s.parse::<T>().ok()
    };
    parsed.ok_or_else(|| {
        KvError::Invalid(format!(
            "'{s}' is not a number from {min} to {max} (decimal or 0x hex)"
        ))
    })
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = KvError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KvError> {
        visitor.visit_string(self.0)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KvError> {
        match self.0.as_str() {
            "on" | "true" => visitor.visit_bool(true),
            "off" | "false" => visitor.visit_bool(false),
            other => Err(KvError::Invalid(format!(
                "'{other}' is not on/off/true/false"
            ))),
        }
    }

    parse_number! {
        deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64,
        deserialize_i8 => visit_i8: i8,
        deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32,
        deserialize_i64 => visit_i64: i64,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KvError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, KvError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, KvError> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    forward_to_deserialize_any! {
        i128 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq tuple tuple_struct
        map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Opt {
        #[serde(alias = "boot")]
        boot_vcpus: u8,
        #[serde(default)]
        shared: bool,
        path: Option<String>,
    }

    #[test]
    fn parses_typed_values() {
        let o: Opt = from_str("boot=2,shared=on,path=\"/a,b\"").expect("parse");
        assert_eq!(
            o,
            Opt {
                boot_vcpus: 2,
                shared: true,
                path: Some("/a,b".into())
            }
        );
    }

    #[test]
    fn rejects_bad_input_with_a_message() {
        let e = from_str::<Opt>("boot=two").expect_err("bad number");
        assert!(e.to_string().contains("'two'"), "{e}");
        let e = from_str::<Opt>("boot=1,colour=red").expect_err("unknown key");
        assert!(e.to_string().contains("colour"), "{e}");
        assert_eq!(
            from_str::<Opt>("boot"),
            Err(KvError::NotKeyValue("boot".into()))
        );
        assert!(from_str::<Opt>("boot=300").is_err());
        assert!(from_str::<Opt>("boot=1,shared=maybe").is_err());
        assert!(matches!(
            from_str::<Opt>("path=\"x"),
            Err(KvError::UnterminatedQuote(_))
        ));
        assert!(from_str::<Opt>("").is_err(), "missing required key");
    }

    #[test]
    fn an_empty_value_is_unset() {
        let o: Opt = from_str("boot=2,path=,shared=").expect("parse");
        assert_eq!(
            o,
            Opt {
                boot_vcpus: 2,
                shared: false,
                path: None
            }
        );
        let o: Opt = from_str("boot=1,path=\"\"").expect("quoted empty");
        assert_eq!(o.path, None);
        let e = from_str::<Opt>("boot=,path=/p").expect_err("required and empty");
        assert_eq!(e.to_string(), "missing field `boot_vcpus`");
    }

    #[test]
    fn value_errors_name_the_key_the_value_and_what_is_allowed() {
        for (input, message) in [
            (
                "boot=two",
                "boot=two: 'two' is not a number from 0 to 255 (decimal or 0x hex)",
            ),
            (
                "boot=256",
                "boot=256: '256' is not a number from 0 to 255 (decimal or 0x hex)",
            ),
            (
                "boot=1,shared=maybe",
                "shared=maybe: 'maybe' is not on/off/true/false",
            ),
        ] {
            let e = from_str::<Opt>(input).expect_err(input);
            assert_eq!(e.to_string(), message, "{input}");
            assert!(matches!(e, KvError::BadValue { .. }), "{input}");
        }
        assert_eq!(
            from_str::<Opt>("boot=1,colour=red,size=2")
                .expect_err("unknown")
                .to_string(),
            "unknown key(s): colour, size (allowed: boot, boot_vcpus, shared, path)"
        );
    }

    #[test]
    fn commas_inside_brackets_and_quotes_do_not_split() {
        assert_eq!(
            split("tap=t0,fd=[3,4],mac=\"a,b\",").expect("pairs"),
            vec![
                ("tap".to_string(), "t0".to_string()),
                ("fd".into(), "[3,4]".into()),
                ("mac".into(), "a,b".into())
            ]
        );
        assert_eq!(split("fd=[3,4"), Err(KvError::Unbalanced("fd=[3,4".into())));
        assert!(split("fd=3]").is_err());
    }

    #[test]
    fn integer_lists() {
        let fds = |v| int_list::<i32>(v, "file descriptors");
        assert_eq!(fds("3"), Ok(vec![3]));
        assert_eq!(fds("[3,4]"), Ok(vec![3, 4]));
        assert_eq!(fds("[3-5,9]"), Ok(vec![3, 4, 5, 9]));
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
            assert!(fds(bad).is_err(), "{bad}");
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
        for bad in ["net0@3", "[net0]", "[@3]", "[net0@[3,x]]", "[]"] {
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
        assert_eq!(
            taken,
            vec![("net_fds".to_string(), "[a@[3,4]]".to_string())]
        );
        let back: std::collections::BTreeMap<String, String> =
            split(&rest).expect("rest").into_iter().collect();
        assert_eq!(
            back.get("source_url").map(String::as_str),
            Some("file:///s")
        );
        assert_eq!(back.get("prefault").map(String::as_str), Some("on"));
    }
}
