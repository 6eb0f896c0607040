//! API requests after HTTP framing: the route table and the JSON bodies of every route
//! (`vmm::api::parse`: `VmConfig` for vm.create, `DiskConfig`, `NetConfig`, `FsConfig`, the
//! bodies of the routes not implemented yet), and the error answer built from a refusal
//! (`vmm::api::response`).
//!
//! Input: byte 0 picks the method (`% 4`: GET, PUT, POST, the next piece), then
//! `[path: u16 len][bytes]`, then the body (the rest).
//!
//! Checks: every configuration accepted survives a JSON round trip (vm.create's also the
//! checks of `nimbus_fuzz::check_vm_config`); a refusal has a 4xx/5xx status and at least one
//! message, and becomes a response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::{check_vm_config, round_trip, Reader};
use vmm::api::{parse, response, ApiRequest};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let m = r.u8();
    let path = r.piece();
    let body = r.rest();
    let method = match m % 4 {
        0 => "GET".to_string(),
        1 => "PUT".to_string(),
        2 => "POST".to_string(),
        _ => String::from_utf8_lossy(body.get(..4).unwrap_or(body)).into_owned(),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    match parse(&method, path, body, Vec::new()) {
        Ok(ApiRequest::VmCreate(config)) => check_vm_config(&config),
        Ok(ApiRequest::AddDisk(disk)) => round_trip(&*disk),
        Ok(ApiRequest::AddNet(net, _)) => round_trip(&*net),
        Ok(ApiRequest::AddFs(fs)) => round_trip(&*fs),
        Ok(_) => {}
        Err(e) => {
            assert!((400..600).contains(&e.status), "status {}", e.status);
            assert!(!e.messages.is_empty());
            let _ = response(Err(e));
        }
    }
});
