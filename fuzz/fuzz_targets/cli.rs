//! Command lines: `nimbus`'s (clap, then `vmm::cli::Cli::vm_config` with `vm_config`'s
//! `key=value,...` parsers for `--cpus`, `--memory`, `--disk`, `--net`, `--fs`, `--rng`,
//! `--serial`, `--console`, `--debug-console`), and the `--block-backend` / `--net-backend`
//! options of `vhost_user_block` and `vhost_user_net`.
//!
//! Input: byte 0 picks the parser (`% 3`: nimbus, block backend, net backend); the rest is the
//! arguments separated by NUL bytes (for the backends, the first argument is the option).
//!
//! Checks: an accepted nimbus configuration survives a JSON round trip, and once valid and
//! named its device ids are distinct and it stays valid (`nimbus_fuzz::check_vm_config`).
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let args: Vec<&str> = text.split('\0').collect();
    match which % 3 {
        0 => {
            let argv = std::iter::once("nimbus").chain(args.iter().copied());
            let Ok(cli) = vmm::cli::Cli::try_parse_from(argv) else {
                return;
            };
            if let Ok(config) = cli.vm_config() {
                nimbus_fuzz::check_vm_config(&config);
            }
        }
        1 => {
            let _ = vhost_user_block::BackendConfig::parse(args[0]);
        }
        _ => {
            let _ = vhost_user_net::BackendConfig::parse(args[0]);
        }
    }
});
