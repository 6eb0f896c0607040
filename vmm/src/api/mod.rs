//! Cloud Hypervisor's REST API: the route table, requests parsed into [`ApiRequest`]s on the
//! API thread, and the answers ([`ApiReply`]) turned into HTTP responses.
//!
//! The API thread only parses and forwards: every request goes to the VMM's command loop
//! ([`crate::controller`]), which alone decides what is legal when.

mod handler;

use std::os::fd::OwnedFd;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_config::requests::{
    RestoreConfig, VmDestinationData, VmReceiveMigrationData, VmRemoveDeviceData, VmResizeData,
    VmResizeDiskData, VmResizeZoneData, VmSendMigrationData,
};
use vm_config::{
    DeviceConfig, DiskConfig, FsConfig, GenericVhostUserConfig, NetConfig, PmemConfig,
    UserDeviceConfig, VdpaConfig, VmConfig, VsockConfig,
};

pub use handler::{serve, ApiServer, ApiServerError};

/// Where the routes live.
pub const API_PREFIX: &str = "/api/v1/";

/// What a route takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// No body (an empty one is accepted).
    None,
    /// A JSON body is required.
    Json,
}

/// One route of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The part after [`API_PREFIX`], e.g. `vm.info`.
    pub name: &'static str,
    /// `GET` or `PUT`.
    pub method: &'static str,
    /// Whether it takes a body.
    pub body: Body,
    /// Whether Nimbus does its work yet (otherwise it answers 500 "not supported yet").
    pub implemented: bool,
}

const fn route(name: &'static str, method: &'static str, body: Body) -> Route {
    Route {
        name,
        method,
        body,
        implemented: true,
    }
}

/// A route whose work arrives with a later Nimbus.
const fn later(name: &'static str, body: Body) -> Route {
    Route {
        name,
        method: "PUT",
        body,
        implemented: false,
    }
}

/// Every route Cloud Hypervisor's API has; the OpenAPI document in `docs/` lists the same.
pub const ROUTES: &[Route] = &[
    route("vmm.ping", "GET", Body::None),
    route("vmm.shutdown", "PUT", Body::None),
    route("vm.create", "PUT", Body::Json),
    route("vm.delete", "PUT", Body::None),
    route("vm.boot", "PUT", Body::None),
    route("vm.shutdown", "PUT", Body::None),
    route("vm.reboot", "PUT", Body::None),
    route("vm.power-button", "PUT", Body::None),
    route("vm.pause", "PUT", Body::None),
    route("vm.resume", "PUT", Body::None),
    route("vm.nmi", "PUT", Body::None),
    route("vm.info", "GET", Body::None),
    route("vm.counters", "GET", Body::None),
    route("vm.resize", "PUT", Body::Json),
    route("vm.resize-disk", "PUT", Body::Json),
    later("vm.resize-zone", Body::Json),
    later("vm.add-device", Body::Json),
    route("vm.add-disk", "PUT", Body::Json),
    route("vm.add-fs", "PUT", Body::Json),
    route("vm.add-pmem", "PUT", Body::Json),
    route("vm.add-net", "PUT", Body::Json),
    route("vm.add-vsock", "PUT", Body::Json),
    later("vm.add-vdpa", Body::Json),
    later("vm.add-user-device", Body::Json),
    later("vm.add-generic-vhost-user", Body::Json),
    route("vm.remove-device", "PUT", Body::Json),
    later("vm.snapshot", Body::Json),
    later("vm.restore", Body::Json),
    later("vm.send-migration", Body::Json),
    later("vm.receive-migration", Body::Json),
    later("vm.coredump", Body::Json),
];

/// A request for the command loop.
#[derive(Debug)]
pub enum ApiRequest {
    /// `vmm.ping`.
    VmmPing,
    /// `vmm.shutdown`.
    VmmShutdown,
    /// `vm.create`.
    VmCreate(Box<VmConfig>),
    /// `vm.delete`.
    VmDelete,
    /// `vm.boot`.
    VmBoot,
    /// `vm.shutdown`.
    VmShutdown,
    /// `vm.reboot`.
    VmReboot,
    /// `vm.power-button`.
    VmPowerButton,
    /// `vm.pause`.
    VmPause,
    /// `vm.resume`.
    VmResume,
    /// `vm.nmi`.
    VmNmi,
    /// `vm.info`.
    VmInfo,
    /// `vm.counters`.
    VmCounters,
    /// `vm.resize` (only `desired_balloon` is implemented).
    VmResize(VmResizeData),
    /// `vm.add-disk`.
    AddDisk(Box<DiskConfig>),
    /// `vm.add-net` with the TAP descriptors that came with it.
    AddNet(Box<NetConfig>, Vec<OwnedFd>),
    /// `vm.add-fs`.
    AddFs(Box<FsConfig>),
    /// `vm.add-vsock`.
    AddVsock(Box<VsockConfig>),
    /// `vm.add-pmem`.
    AddPmem(Box<PmemConfig>),
    /// `vm.remove-device`.
    RemoveDevice(String),
    /// `vm.resize-disk`.
    ResizeDisk(VmResizeDiskData),
    /// A route whose work arrives with a later Nimbus (its body was well-formed).
    NotYet(&'static str),
}

/// What a request produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ApiBody {
    /// 204, nothing to say.
    NoContent,
    /// 200 with a JSON body.
    Json(Vec<u8>),
    /// 200 with an empty body (`vmm.shutdown`, as Cloud Hypervisor answers it).
    EmptyOk,
}

/// A failed request: the HTTP status and the messages, outermost first, root cause last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// 400, 404, 409, 429 or 500.
    pub status: u16,
    /// The messages.
    pub messages: Vec<String>,
}

impl ApiError {
    /// An error with `status` saying `context`, then `error`'s chain.
    pub fn new(status: u16, context: &str, error: &dyn std::error::Error) -> Self {
        let mut messages = vec!["Error from API".to_string(), context.to_string()];
        let mut next = Some(error);
        while let Some(e) = next {
            messages.push(e.to_string());
            next = e.source();
        }
        Self { status, messages }
    }

    /// An error with `status` and the single message chain `messages`.
    pub fn plain(status: u16, messages: &[&str]) -> Self {
        let mut all = vec!["Error from API".to_string()];
        all.extend(messages.iter().map(|m| m.to_string()));
        Self {
            status,
            messages: all,
        }
    }

    fn bad_request(message: &str) -> Self {
        Self {
            status: 400,
            messages: vec!["Bad Request".into(), message.into()],
        }
    }
}

/// The command loop's answer to one request.
pub type ApiReply = Result<ApiBody, ApiError>;

/// The answer as an HTTP response.
pub fn response(reply: ApiReply) -> api_http::Response {
    match reply {
        Ok(ApiBody::NoContent) => api_http::Response::empty(204),
        Ok(ApiBody::Json(body)) => api_http::Response::json(200, body),
        Ok(ApiBody::EmptyOk) => api_http::Response::json(200, Vec::new()),
        Err(e) => api_http::Response::error(e.status, &e.messages),
    }
}

/// `vmm.ping`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PingResponse {
    /// The build.
    pub build_version: String,
    /// The Cloud Hypervisor API version Nimbus follows.
    pub version: String,
    /// The VMM's process id.
    pub pid: i64,
    /// Optional features built in.
    pub features: Vec<String>,
}

/// The answer to a device added to a booted VM (Cloud Hypervisor's `PciDeviceInfo`).
#[derive(Debug, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// The device's id.
    pub id: String,
    /// Its PCI address, `0000:00:05.0`.
    pub bdf: String,
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        messages: vec!["Failed to deserialize JSON".into(), e.to_string()],
    })
}

/// Checks that `body` is a `T`.
fn check<T: DeserializeOwned>(body: &[u8]) -> Result<(), ApiError> {
    json::<T>(body).map(|_| ())
}

/// The route `request` names, or the error to answer.
pub fn find_route(method: &str, path: &str) -> Result<&'static Route, ApiError> {
    let name = path
        .split('?')
        .next()
        .and_then(|p| p.strip_prefix(API_PREFIX))
        .ok_or_else(|| ApiError {
            status: 404,
            messages: vec!["Not Found".into()],
        })?;
    let route = ROUTES
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ApiError {
            status: 404,
            messages: vec!["Not Found".into()],
        })?;
    if route.method != method {
        return Err(ApiError::bad_request(&format!(
            "{name} takes {}, not {method}",
            route.method
        )));
    }
    Ok(route)
}

/// Parses an HTTP request into an [`ApiRequest`]; descriptors that came with it go to the
/// routes that take them (`vm.add-net`), others are closed.
pub fn parse(
    method: &str,
    path: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<ApiRequest, ApiError> {
    let route = find_route(method, path)?;
    match route.body {
        Body::None if !body.is_empty() => {
            return Err(ApiError::bad_request(&format!(
                "{} takes no body",
                route.name
            )))
        }
        Body::Json if body.is_empty() => {
            return Err(ApiError::bad_request(&format!(
                "{} needs a JSON body",
                route.name
            )))
        }
        _ => {}
    }
    if !fds.is_empty() && route.name != "vm.add-net" {
        // Dropping them closes them.
        log::debug!("{}: {} descriptor(s) ignored", route.name, fds.len());
    }
    Ok(match route.name {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.create" => {
            let mut config: VmConfig = json(body)?;
            // Descriptors come with vm.add-net, never as numbers in a body.
            for n in config.net.iter_mut().flatten() {
                n.fds = None;
            }
            ApiRequest::VmCreate(Box::new(config))
        }
        "vm.delete" => ApiRequest::VmDelete,
        "vm.boot" => ApiRequest::VmBoot,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.power-button" => ApiRequest::VmPowerButton,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.nmi" => ApiRequest::VmNmi,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.resize" => ApiRequest::VmResize(json(body)?),
        "vm.add-disk" => ApiRequest::AddDisk(json(body)?),
        "vm.add-net" => {
            let mut net: Box<NetConfig> = json(body)?;
            net.fds = None;
            // One descriptor per queue pair: without num_queues, the descriptors say how many.
            let explicit = json::<serde_json::Map<String, serde_json::Value>>(body)
                .is_ok_and(|m| m.contains_key("num_queues"));
            if !explicit && !fds.is_empty() {
                net.num_queues = 2 * fds.len();
            }
            ApiRequest::AddNet(net, fds)
        }
        "vm.add-fs" => ApiRequest::AddFs(json(body)?),
        "vm.add-vsock" => ApiRequest::AddVsock(json(body)?),
        "vm.add-pmem" => ApiRequest::AddPmem(json(body)?),
        "vm.remove-device" => ApiRequest::RemoveDevice(json::<VmRemoveDeviceData>(body)?.id),
        "vm.resize-disk" => ApiRequest::ResizeDisk(json(body)?),
        // Not implemented yet: the body must still be what the route takes (400 otherwise).
        name => {
            match name {
                "vm.resize-zone" => check::<VmResizeZoneData>(body)?,
                "vm.add-device" => check::<DeviceConfig>(body)?,
                "vm.add-vdpa" => check::<VdpaConfig>(body)?,
                "vm.add-user-device" => check::<UserDeviceConfig>(body)?,
                "vm.add-generic-vhost-user" => check::<GenericVhostUserConfig>(body)?,
                "vm.snapshot" | "vm.coredump" => check::<VmDestinationData>(body)?,
                "vm.restore" => check::<RestoreConfig>(body)?,
                "vm.send-migration" => check::<VmSendMigrationData>(body)?,
                "vm.receive-migration" => check::<VmReceiveMigrationData>(body)?,
                _ => {}
            }
            ApiRequest::NotYet(route.name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(method: &str, name: &str, body: &str) -> ApiRequest {
        parse(
            method,
            &format!("{API_PREFIX}{name}"),
            body.as_bytes(),
            Vec::new(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    }

    fn parse_err(method: &str, path: &str, body: &str) -> ApiError {
        match parse(method, path, body.as_bytes(), Vec::new()) {
            Ok(r) => panic!("{path} parsed as {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_route_parses() {
        for r in ROUTES {
            let body = if r.body == Body::Json {
                match r.name {
                    "vm.create" => r#"{"payload":{"kernel":"/k"}}"#,
                    "vm.add-disk" => r#"{"path":"/d"}"#,
                    "vm.add-fs" => r#"{"tag":"t","socket":"/s"}"#,
                    "vm.remove-device" | "vm.resize-disk" => r#"{"id":"_disk0","desired_size":1}"#,
                    "vm.resize-zone" => r#"{"id":"z","desired_ram":1}"#,
                    "vm.add-pmem" => r#"{"file":"/p"}"#,
                    "vm.add-vsock" => r#"{"cid":3,"socket":"/v"}"#,
                    "vm.add-vdpa" => r#"{"path":"/dev/vhost-vdpa-0"}"#,
                    "vm.add-user-device" => r#"{"socket":"/u"}"#,
                    "vm.add-generic-vhost-user" => {
                        r#"{"socket":"/g","queue_sizes":[256],"device_type":26}"#
                    }
                    "vm.snapshot" | "vm.coredump" | "vm.send-migration" => {
                        r#"{"destination_url":"file:///tmp/s"}"#
                    }
                    "vm.restore" => r#"{"source_url":"file:///tmp/s"}"#,
                    "vm.receive-migration" => r#"{"receiver_url":"unix:/tmp/m"}"#,
                    _ => "{}",
                }
            } else {
                ""
            };
            let request = parse_ok(r.method, r.name, body);
            assert_eq!(
                matches!(request, ApiRequest::NotYet(_)),
                !r.implemented,
                "{}",
                r.name
            );
        }
        assert_eq!(ROUTES.len(), 31);
    }

    #[test]
    fn bad_requests_get_cloud_hypervisors_statuses() {
        assert_eq!(parse_err("GET", "/api/v1/vm.nope", "").status, 404);
        assert_eq!(parse_err("GET", "/elsewhere", "").status, 404);
        assert_eq!(parse_err("GET", "/api/v1/vm.boot", "").status, 400);
        assert_eq!(parse_err("DELETE", "/api/v1/vm.info", "").status, 400);
        assert_eq!(parse_err("PUT", "/api/v1/vm.boot", "{}").status, 400);
        assert_eq!(parse_err("PUT", "/api/v1/vm.create", "").status, 400);
        let e = parse_err("PUT", "/api/v1/vm.create", "{\"cpus\":7}");
        assert_eq!(e.status, 400);
        assert_eq!(e.messages[0], "Failed to deserialize JSON");
        assert_eq!(
            parse_err("PUT", "/api/v1/vm.remove-device", "{}").status,
            400
        );
        assert_eq!(parse_err("PUT", "/api/v1/vm.snapshot", "[1").status, 400);
        // Routes not implemented yet still check their bodies.
        for (route, body) in [
            ("vm.resize", r#"{"desired_vcpus":"x"}"#),
            ("vm.restore", "{}"),
            ("vm.send-migration", r#"{"local":true}"#),
        ] {
            let e = parse_err("PUT", &format!("{API_PREFIX}{route}"), body);
            assert_eq!(e.status, 400, "{route} {body}: {e:?}");
        }
    }

    #[test]
    fn descriptor_numbers_in_bodies_are_ignored() {
        match parse_ok("PUT", "vm.add-net", r#"{"fds":[0,1,2]}"#) {
            ApiRequest::AddNet(net, fds) => {
                assert_eq!(net.fds, None);
                assert!(fds.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match parse_ok("PUT", "vm.create", r#"{"net":[{"fds":[5]}]}"#) {
            ApiRequest::VmCreate(c) => assert_eq!(c.net.unwrap_or_default()[0].fds, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn descriptors_set_the_queue_count_unless_the_body_does() {
        let fds = || -> Vec<OwnedFd> {
            (0..2)
                .map(|_| {
                    std::fs::File::open("/dev/null")
                        .map(OwnedFd::from)
                        .expect("open")
                })
                .collect()
        };
        let path = format!("{API_PREFIX}vm.add-net");
        match parse("PUT", &path, br#"{"mac":"52:54:00:00:00:01"}"#, fds()) {
            Ok(ApiRequest::AddNet(net, fds)) => assert_eq!((net.num_queues, fds.len()), (4, 2)),
            other => panic!("{other:?}"),
        }
        match parse("PUT", &path, br#"{"num_queues":2}"#, fds()) {
            Ok(ApiRequest::AddNet(net, _)) => assert_eq!(net.num_queues, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_become_json_arrays() {
        let r = response(Err(ApiError::plain(404, &["VM is not created"])));
        assert_eq!(r.status, 404);
        let body: Vec<String> =
            serde_json::from_slice(r.body.as_deref().unwrap_or_default()).expect("json");
        assert_eq!(body, ["Error from API", "VM is not created"]);
        assert_eq!(response(Ok(ApiBody::NoContent)).body, None);
        assert_eq!(response(Ok(ApiBody::EmptyOk)).body, Some(Vec::new()));
    }
}
