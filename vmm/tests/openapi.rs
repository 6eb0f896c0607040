//! `docs/openapi.yaml` against the code, so the document cannot fall behind it:
//! - its paths and methods are exactly [`vmm::api::ROUTES`], and an operation has a
//!   `requestBody` exactly when its route takes [`Body::Json`];
//! - the operations marked `x-nimbus-implemented: false` are exactly the routes Nimbus answers
//!   "not supported by Nimbus yet" ([`ApiRequest::NotYet`]);
//! - the `VmConfig` schema lists every field `vm_config::VmConfig` has (the keys of its
//!   default and of one with every `Option` filled), the schemas of the sections Nimbus
//!   implements list every field of their structs (serde's own field lists; aliases must be
//!   named in the schema's text), and the documented `default:`s are serde's.
//!
//! No KVM is needed. No YAML crate either: a small line reader takes what it needs from the
//! document, which therefore keeps this layout (stated at the top of the document too):
//! - two spaces per level, no tabs; comment lines and the contents of block scalars (`|`, `>`)
//!   are skipped, so free text belongs in block scalars or on one line;
//! - `paths:` and `components:` at column 0; a path at 2 spaces (`  /vm.info:`), its methods
//!   at 4 (`    get:`), an operation's own keys at 6 (`requestBody:`,
//!   `x-nimbus-implemented: false`);
//! - under `  schemas:` (2 spaces), a schema at 4, its `properties:` at 6, each property at 8
//!   and a property's own keys (`default:`) at 10.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::de::{DeserializeOwned, Visitor};
use serde_json::{json, Value};
use vm_config::{
    ConsoleConfig, CpuAffinity, CpuFeatures, CpuTopology, CpusConfig, DebugConsoleConfig,
    DiskConfig, FsConfig, MemoryConfig, NetConfig, PayloadConfig, PlatformConfig, RngConfig,
    VmConfig,
};
use vmm::api::{Body, ROUTES};

const DOC_PATH: &str = "../docs/openapi.yaml";

fn doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC_PATH);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The line reader
// ---------------------------------------------------------------------------------------------

/// A line of the document that matters: not blank, not a comment, not inside a block scalar.
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    /// 1-based line number.
    number: usize,
    /// Leading spaces.
    indent: usize,
    /// The mapping key, when the line is `key:` or `key: value` (quotes removed).
    key: Option<&'a str>,
    /// What follows `key:` (the whole text when there is no key).
    value: &'a str,
}

/// Splits `key: value` / `key:`; `None` for sequence items and plain text.
fn split_key(text: &str) -> (Option<&str>, &str) {
    if text.starts_with('-') {
        return (None, text);
    }
    let (key, value) = if let Some(key) = text.strip_suffix(':') {
        (key, "")
    } else if let Some((key, value)) = text.split_once(": ") {
        (key, value.trim())
    } else {
        return (None, text);
    };
    let unquoted = key
        .strip_prefix('\'')
        .and_then(|k| k.strip_suffix('\''))
        .or_else(|| key.strip_prefix('"').and_then(|k| k.strip_suffix('"')))
        .unwrap_or(key);
    if unquoted.contains(' ') && unquoted == key {
        // Text such as a wrapped sentence, not a key.
        return (None, text);
    }
    (Some(unquoted), value)
}

fn lines(doc: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    // The indentation of the key whose value is a block scalar being skipped.
    let mut block: Option<usize> = None;
    for (i, raw) in doc.lines().enumerate() {
        assert!(
            !raw.contains('\t'),
            "{DOC_PATH}:{}: a tab (use spaces)",
            i + 1
        );
        let text = raw.trim_start_matches(' ');
        if text.is_empty() {
            continue;
        }
        let indent = raw.len() - text.len();
        if let Some(b) = block {
            if indent > b {
                continue;
            }
            block = None;
        }
        if text.starts_with('#') {
            continue;
        }
        let (key, value) = split_key(text.trim_end());
        if key.is_some() && (value.starts_with('|') || value.starts_with('>')) {
            block = Some(indent);
        }
        out.push(Line {
            number: i + 1,
            indent,
            key,
            value,
        });
    }
    out
}

/// The lines under the key `key` at `indent` (within `lines`), up to the next line indented
/// `indent` or less.
fn section<'a, 'b>(lines: &'b [Line<'a>], indent: usize, key: &str) -> Option<&'b [Line<'a>]> {
    let start = lines
        .iter()
        .position(|l| l.indent == indent && l.key == Some(key))?
        + 1;
    let len = lines[start..]
        .iter()
        .position(|l| l.indent <= indent)
        .unwrap_or(lines.len() - start);
    Some(&lines[start..start + len])
}

/// One operation of `paths:`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Operation {
    /// The path without its leading `/`, e.g. `vm.info`.
    route: String,
    /// Upper case, e.g. `GET`.
    method: String,
    request_body: bool,
    /// `false` when marked `x-nimbus-implemented: false`.
    implemented: bool,
    line: usize,
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn operations(doc: &str) -> Vec<Operation> {
    let lines = lines(doc);
    let paths = section(&lines, 0, "paths").unwrap_or_else(|| panic!("{DOC_PATH}: no `paths:`"));
    let mut ops: Vec<Operation> = Vec::new();
    let mut route: Option<&str> = None;
    let mut in_operation = false;
    for l in paths {
        match (l.indent, l.key) {
            (2, Some(path)) => {
                let name = path
                    .strip_prefix('/')
                    .unwrap_or_else(|| panic!("{DOC_PATH}:{}: a path must start with /", l.number));
                route = Some(name);
                in_operation = false;
            }
            (4, Some(key)) => {
                in_operation = METHODS.contains(&key);
                if in_operation {
                    let route = route.unwrap_or_else(|| {
                        panic!("{DOC_PATH}:{}: a method outside a path", l.number)
                    });
                    ops.push(Operation {
                        route: route.to_string(),
                        method: key.to_uppercase(),
                        request_body: false,
                        implemented: true,
                        line: l.number,
                    });
                }
            }
            (6, Some(key)) if in_operation => {
                let Some(op) = ops.last_mut() else { continue };
                match key {
                    "requestBody" => op.request_body = true,
                    "x-nimbus-implemented" => op.implemented = l.value != "false",
                    _ => {}
                }
            }
            (2 | 4, None) => panic!("{DOC_PATH}:{}: expected a key here", l.number),
            _ => {}
        }
    }
    ops
}

/// A schema of `components.schemas`: its properties (name → the property's own lines) and
/// its text.
#[derive(Debug)]
struct Schema<'a> {
    properties: BTreeMap<&'a str, Vec<Line<'a>>>,
    /// The schema's text, for aliases named in descriptions.
    text: String,
}

fn schema<'a>(doc: &'a str, lines: &[Line<'a>], name: &str) -> Schema<'a> {
    let missing = || panic!("{DOC_PATH}: no schema {name} under components.schemas");
    let components = section(lines, 0, "components").unwrap_or_else(missing);
    let schemas = section(components, 2, "schemas").unwrap_or_else(missing);
    let body = section(schemas, 4, name).unwrap_or_else(missing);
    let mut properties: BTreeMap<&str, Vec<Line>> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for l in section(body, 6, "properties").unwrap_or_default() {
        match (l.indent, l.key) {
            (8, Some(key)) => {
                properties.insert(key, Vec::new());
                current = Some(key);
            }
            (8, None) => panic!("{DOC_PATH}:{}: expected a property name", l.number),
            _ => {
                if let Some(p) = current.and_then(|c| properties.get_mut(c)) {
                    p.push(*l);
                }
            }
        }
    }
    // From the schema's first line to the line before whatever follows it (block scalars
    // included).
    let first = body.first().map_or(0, |l| l.number);
    let last = body.last().map_or(0, |l| l.number);
    let end = lines
        .iter()
        .find(|l| l.number > last)
        .map_or(usize::MAX, |l| l.number);
    let text = doc
        .lines()
        .enumerate()
        .filter(|(i, _)| (first..end).contains(&(i + 1)))
        .map(|(_, line)| line)
        .collect::<Vec<_>>()
        .join("\n");
    Schema { properties, text }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// Every difference between `doc`'s operations and [`ROUTES`].
fn route_differences(doc: &str) -> Vec<String> {
    let ops = operations(doc);
    let mut errors = Vec::new();
    for r in ROUTES {
        let documented: Vec<&Operation> = ops.iter().filter(|o| o.route == r.name).collect();
        match documented.as_slice() {
            [] => errors.push(format!(
                "{} {} is in ROUTES but not in {DOC_PATH}",
                r.method, r.name
            )),
            [op] => {
                if op.method != r.method {
                    errors.push(format!(
                        "{}: ROUTES says {}, {DOC_PATH}:{} says {}",
                        r.name, r.method, op.line, op.method
                    ));
                }
                let json = r.body == Body::Json;
                if op.request_body != json {
                    errors.push(format!(
                        "{}: the route takes {:?} but {DOC_PATH}:{} {} a requestBody",
                        r.name,
                        r.body,
                        op.line,
                        if op.request_body { "has" } else { "has no" }
                    ));
                }
            }
            more => errors.push(format!(
                "{}: {} methods in {DOC_PATH} (lines {:?}); the route has one",
                r.name,
                more.len(),
                more.iter().map(|o| o.line).collect::<Vec<_>>()
            )),
        }
    }
    for op in &ops {
        if !ROUTES.iter().any(|r| r.name == op.route) {
            errors.push(format!(
                "{DOC_PATH}:{}: {} /{} is not in ROUTES",
                op.line, op.method, op.route
            ));
        }
    }
    errors
}

#[test]
fn every_route_is_documented_with_its_method_and_body() {
    let errors = route_differences(&doc());
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
    assert_eq!(operations(&doc()).len(), ROUTES.len());
}

#[test]
fn a_route_missing_from_the_document_is_reported() {
    // The document without its /vm.nmi path: as if vm.nmi had just been added to ROUTES.
    let doc = doc();
    let mut skipping = false;
    let without: Vec<&str> = doc
        .lines()
        .filter(|line| {
            if line.starts_with("  /") {
                skipping = *line == "  /vm.nmi:";
            } else if !line.is_empty() && !line.starts_with("   ") {
                skipping = false;
            }
            !skipping
        })
        .collect();
    let errors = route_differences(&without.join("\n"));
    let expected = format!("PUT vm.nmi is in ROUTES but not in {DOC_PATH}");
    assert!(errors.contains(&expected), "{errors:?}");
    // A method changed, a body added.
    let changed = doc.replace("  /vm.info:\n    get:", "  /vm.info:\n    put:");
    assert!(route_differences(&changed)
        .iter()
        .any(|e| e.contains("vm.info: ROUTES says GET")));
    let changed = doc.replace(
        "  /vm.boot:\n    put:\n",
        "  /vm.boot:\n    put:\n      requestBody:\n        required: true\n",
    );
    assert!(route_differences(&changed)
        .iter()
        .any(|e| e.contains("vm.boot: the route takes None but")));
}

#[test]
fn routes_marked_not_implemented_are_the_ones_nimbus_answers_not_yet() {
    let ops = operations(&doc());
    let mut errors = Vec::new();
    for op in &ops {
        let Some(route) = ROUTES.iter().find(|r| r.name == op.route) else {
            continue;
        };
        let not_yet = !route.implemented;
        if not_yet == op.implemented {
            errors.push(format!(
                "{DOC_PATH}:{}: {} is {}implemented in Nimbus but the document says {}",
                op.line,
                op.route,
                if not_yet { "not " } else { "" },
                if op.implemented {
                    "it is (add `x-nimbus-implemented: false`)"
                } else {
                    "`x-nimbus-implemented: false`"
                }
            ));
        }
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The configuration schemas
// ---------------------------------------------------------------------------------------------

fn from<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"))
}

/// A configuration with every `Option` filled and every field skipped when false set, so that
/// it serializes every field. Every field is named: a field added to `VmConfig` stops this
/// from compiling until it is added here (and to the document).
fn filled() -> VmConfig {
    let mut net: NetConfig = from(json!({
        "id": "n", "iommu": true, "pci_segment": 0, "pci_device_id": 4, "tap": "tap0",
        "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": "12:34:56:78:9a:bc",
        "host_mac": "12:34:56:78:9a:bd", "mtu": 1500, "num_queues": 2, "queue_size": 256,
        "vhost_user": false, "vhost_socket": "/n.sock", "vhost_mode": "Client",
        "rate_limiter_config": {"bandwidth": null, "ops": null},
        "offload_tso": true, "offload_ufo": true, "offload_csum": true
    }));
    // Descriptor numbers are ignored in JSON; they appear once received.
    net.fds = Some(vec![3]);
    let topology = json!({
        "threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 1
    });
    VmConfig {
        cpus: from(json!({
            "boot_vcpus": 1, "max_vcpus": 2, "topology": topology, "kvm_hyperv": false,
            "max_phys_bits": 46, "affinity": [{"vcpu": 0, "host_cpus": [0]}],
            "features": {"amx": false}, "nested": true
        })),
        memory: from(json!({
            "size": 1 << 30, "mergeable": false, "hotplug_method": "Acpi",
            "hotplug_size": 1 << 30, "hotplugged_size": 0, "shared": true, "hugepages": true,
            "hugepage_size": 2 << 20, "prefault": false, "zones": [], "thp": true
        })),
        payload: Some(from(json!({
            "firmware": "/fw", "kernel": "/k", "cmdline": "console=ttyS0", "initramfs": "/i"
        }))),
        rate_limit_groups: Some(Vec::new()),
        disks: Some(vec![from(json!({
            "id": "d", "iommu": true, "pci_segment": 0, "pci_device_id": 3, "path": "/d.img",
            "readonly": false, "direct": false, "num_queues": 1, "queue_size": 128,
            "vhost_user": false, "vhost_socket": "/d.sock", "rate_limit_group": "g",
            "rate_limiter_config": {"bandwidth": null, "ops": null},
            "disable_io_uring": false, "disable_aio": false, "serial": "s",
            "queue_affinity": [{"queue_index": 0, "host_cpus": [0]}], "backing_files": false,
            "sparse": true, "image_type": "Raw", "poll_us": 32
        }))]),
        net: Some(vec![net]),
        rng: from(json!({"src": "/dev/urandom", "iommu": true})),
        balloon: Some(from(json!({"size": 0}))),
        fs: Some(vec![from(json!({
            "id": "f", "pci_segment": 0, "pci_device_id": 5, "tag": "t", "socket": "/f.sock",
            "num_queues": 1, "queue_size": 1024
        }))]),
        pmem: Some(Vec::new()),
        serial: from(json!({"file": "/s", "mode": "File", "iommu": true, "socket": "/s.sock"})),
        console: from(json!({"file": "/c", "mode": "File", "iommu": true, "socket": "/c.sock"})),
        debug_console: from(json!({
            "file": "/e", "mode": "Off", "iobase": 233, "socket": "/e.sock"
        })),
        devices: Some(Vec::new()),
        user_devices: Some(Vec::new()),
        vdpa: Some(Vec::new()),
        vsock: Some(from(json!({"cid": 3, "socket": "/v.sock"}))),
        pvpanic: true,
        iommu: true,
        numa: Some(Vec::new()),
        watchdog: true,
        pci_segments: Some(vec![from(json!({
            "pci_segment": 0, "mmio32_aperture_weight": 1, "mmio64_aperture_weight": 2
        }))]),
        platform: Some(from(json!({
            "num_pci_segments": 1, "iommu_segments": [0], "iommu_address_width_bits": 64,
            "serial_number": "sn", "uuid": "u", "oem_strings": ["o"]
        }))),
        tpm: Some(from(json!({"socket": "/t.sock"}))),
        landlock_enable: true,
        landlock_rules: Some(Vec::new()),
    }
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

/// What is in `serialized` but not in the schema, and the reverse when `exact`.
fn key_differences(name: &str, schema: &Schema, serialized: &Value, exact: bool) -> Vec<String> {
    let documented: BTreeSet<String> = schema.properties.keys().map(|k| k.to_string()).collect();
    let serialized = keys(serialized);
    let mut errors: Vec<String> = serialized
        .difference(&documented)
        .map(|k| format!("{name}.{k} is serialized but not documented in {DOC_PATH}"))
        .collect();
    if exact {
        errors.extend(
            documented
                .difference(&serialized)
                .map(|k| format!("{name}.{k} is documented in {DOC_PATH} but not a field")),
        );
    }
    errors
}

#[test]
fn the_vm_config_schema_has_every_field() {
    let doc = doc();
    let lines = lines(&doc);
    let vm_config = schema(&doc, &lines, "VmConfig");
    let default = serde_json::to_value(VmConfig::default()).expect("serialize");
    let filled = serde_json::to_value(filled()).expect("serialize");
    let mut errors = key_differences("VmConfig", &vm_config, &default, false);
    errors.extend(key_differences("VmConfig", &vm_config, &filled, true));
    // The sections Nimbus implements, with their own schemas.
    for (name, value) in [
        ("CpusConfig", &filled["cpus"]),
        ("CpuTopology", &filled["cpus"]["topology"]),
        ("CpuFeatures", &filled["cpus"]["features"]),
        ("MemoryConfig", &filled["memory"]),
        ("PayloadConfig", &filled["payload"]),
        ("DiskConfig", &filled["disks"][0]),
        ("NetConfig", &filled["net"][0]),
        ("RngConfig", &filled["rng"]),
        ("FsConfig", &filled["fs"][0]),
        ("ConsoleConfig", &filled["serial"]),
        ("DebugConsoleConfig", &filled["debug_console"]),
        ("PlatformConfig", &filled["platform"]),
        ("PciSegmentConfig", &filled["pci_segments"][0]),
    ] {
        errors.extend(key_differences(
            name,
            &schema(&doc, &lines, name),
            value,
            true,
        ));
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

// serde's list of a struct's field names (aliases included): what `Deserialize` passes to
// `deserialize_struct`, captured by a deserializer that stops there.

#[derive(Debug)]
struct Captured(Option<&'static [&'static str]>);

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "captured {:?}", self.0)
    }
}

impl std::error::Error for Captured {}

impl serde::de::Error for Captured {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Captured(None)
    }
}

struct FieldNames;

impl<'de> serde::Deserializer<'de> for FieldNames {
    type Error = Captured;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
        Err(Captured(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Captured> {
        Err(Captured(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldNames) {
        Err(Captured(Some(fields))) => fields,
        _ => panic!("{} is not a plain struct", std::any::type_name::<T>()),
    }
}

#[test]
fn every_serde_field_and_alias_is_documented() {
    let doc = doc();
    let lines = lines(&doc);
    let mut errors = Vec::new();
    for (name, fields) in [
        ("VmConfig", field_names::<VmConfig>()),
        ("CpusConfig", field_names::<CpusConfig>()),
        ("CpuTopology", field_names::<CpuTopology>()),
        ("CpuFeatures", field_names::<CpuFeatures>()),
        ("CpuAffinity", field_names::<CpuAffinity>()),
        ("MemoryConfig", field_names::<MemoryConfig>()),
        ("PayloadConfig", field_names::<PayloadConfig>()),
        ("DiskConfig", field_names::<DiskConfig>()),
        ("NetConfig", field_names::<NetConfig>()),
        ("RngConfig", field_names::<RngConfig>()),
        ("FsConfig", field_names::<FsConfig>()),
        ("ConsoleConfig", field_names::<ConsoleConfig>()),
        ("DebugConsoleConfig", field_names::<DebugConsoleConfig>()),
        ("PlatformConfig", field_names::<PlatformConfig>()),
    ] {
        let schema = schema(&doc, &lines, name);
        for field in fields {
            // An alias is named in the text of its schema, e.g. "also read as `boot`".
            if !schema.properties.contains_key(field)
                && !schema.text.contains(&format!("`{field}`"))
            {
                errors.push(format!(
                    "{name}: serde reads `{field}`, which {DOC_PATH} neither lists nor names"
                ));
            }
        }
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

/// The value of a YAML scalar as JSON.
fn scalar(text: &str) -> Value {
    let unquoted = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .unwrap_or(text);
    match unquoted {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => unquoted
            .parse::<u64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(unquoted)),
    }
}

#[test]
fn documented_defaults_are_serdes() {
    let doc = doc();
    let lines = lines(&doc);
    // Each schema with what serde makes of a body that gives only the required fields.
    let cases: Vec<(&str, Value)> = vec![
        (
            "VmConfig",
            serde_json::to_value(from::<VmConfig>(json!({}))).expect("json"),
        ),
        (
            "CpusConfig",
            serde_json::to_value(from::<CpusConfig>(json!({}))).expect("json"),
        ),
        (
            "CpuFeatures",
            serde_json::to_value(from::<CpuFeatures>(json!({}))).expect("json"),
        ),
        (
            "MemoryConfig",
            serde_json::to_value(from::<MemoryConfig>(json!({}))).expect("json"),
        ),
        (
            "DiskConfig",
            serde_json::to_value(from::<DiskConfig>(json!({}))).expect("json"),
        ),
        (
            "NetConfig",
            serde_json::to_value(from::<NetConfig>(json!({}))).expect("json"),
        ),
        (
            "RngConfig",
            serde_json::to_value(from::<RngConfig>(json!({}))).expect("json"),
        ),
        (
            "FsConfig",
            serde_json::to_value(from::<FsConfig>(json!({"tag": "t", "socket": "/s"})))
                .expect("json"),
        ),
        (
            "ConsoleConfig",
            serde_json::to_value(from::<ConsoleConfig>(json!({"mode": "Off"}))).expect("json"),
        ),
        (
            "DebugConsoleConfig",
            serde_json::to_value(from::<DebugConsoleConfig>(json!({"mode": "Off"}))).expect("json"),
        ),
        (
            "PlatformConfig",
            serde_json::to_value(from::<PlatformConfig>(json!({}))).expect("json"),
        ),
    ];
    let mut errors = Vec::new();
    let mut compared = 0;
    for (name, value) in &cases {
        let schema = schema(&doc, &lines, name);
        for (property, own) in &schema.properties {
            let Some(default) = own
                .iter()
                .find(|l| l.indent == 10 && l.key == Some("default"))
            else {
                continue;
            };
            // Fields left out when unset or false have nothing to compare.
            let Some(actual) = value.get(*property) else {
                continue;
            };
            compared += 1;
            let documented = scalar(default.value);
            if *actual != documented {
                errors.push(format!(
                    "{DOC_PATH}:{}: {name}.{property} default {documented}, serde's is {actual}",
                    default.number
                ));
            }
        }
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
    assert!(compared > 30, "only {compared} defaults compared");
}

#[test]
fn the_reader_skips_block_scalars_and_comments() {
    let doc = "# a: comment\npaths:\n  /a.b:\n    put:\n      description: |\n        \
               requestBody: not a key\n      x-nimbus-implemented: false\n  /c.d:\n    get:\n      \
               requestBody:\n        required: true\ncomponents:\n";
    let ops = operations(doc);
    assert_eq!(
        ops.iter()
            .map(|o| (
                o.route.as_str(),
                o.method.as_str(),
                o.request_body,
                o.implemented
            ))
            .collect::<Vec<_>>(),
        [("a.b", "PUT", false, false), ("c.d", "GET", true, true)]
    );
}
