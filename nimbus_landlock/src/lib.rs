//! Landlock: a process limits its own file-system access to the paths it names (Cloud
//! Hypervisor's `--landlock` and `--landlock-rules path=,access=`).
//!
//! A [`PathRule`] grants read, write or both beneath a path (a directory and everything in it,
//! or one file); [`restrict`] makes every access outside the rules fail with EACCES for the
//! calling thread and every thread it starts later (on kernels with Landlock ABI 8, Linux 7.0,
//! for every thread of the process). Files opened before keep working. Rules cannot be widened
//! later: a path a VM needs after the restriction (a hot-added disk) must be under a rule.
#![deny(missing_docs)]

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use landlock::{
    Access as _, AccessFs, BitFlags, LandlockStatus, PathBeneath, PathFd, RestrictSelfAttr,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};

/// The newest Landlock ABI Nimbus knows the rights of; older kernels enforce what they can.
const ABI_USED: ABI = ABI::V7;

/// What a rule allows beneath its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `r`: read files, list directories, execute.
    Read,
    /// `w`: write and truncate files, create and remove entries (files, sockets, ...).
    Write,
    /// `rw`: both.
    ReadWrite,
    /// Remove files and sockets beneath (a daemon removing its socket at exit); not a
    /// command-line value.
    RemoveEntries,
}

impl Access {
    /// Parses Cloud Hypervisor's `access=` values: `r`, `w` or `rw`.
    ///
    /// # Errors
    ///
    /// [`LandlockError::Access`] for anything else.
    pub fn parse(value: &str) -> Result<Self, LandlockError> {
        match value {
            "r" => Ok(Self::Read),
            "w" => Ok(Self::Write),
            "rw" => Ok(Self::ReadWrite),
            other => Err(LandlockError::Access(other.to_string())),
        }
    }

    fn rights(self) -> BitFlags<AccessFs> {
        match self {
            Self::Read => AccessFs::from_read(ABI_USED),
            Self::Write => AccessFs::from_write(ABI_USED),
            Self::ReadWrite => AccessFs::from_all(ABI_USED),
            Self::RemoveEntries => AccessFs::RemoveFile.into(),
        }
    }
}

/// Access beneath one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    /// A directory (the rule covers everything beneath it) or a file.
    pub path: PathBuf,
    /// What is allowed there.
    pub access: Access,
}

impl PathRule {
    /// `access` beneath `path`.
    pub fn new(path: impl Into<PathBuf>, access: Access) -> Self {
        Self {
            path: path.into(),
            access,
        }
    }
}

/// Errors restricting the process.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// An `access=` value other than r, w or rw.
    #[error("landlock access '{0}' is not r, w or rw")]
    Access(String),
    /// A rule's path cannot be opened (it must exist).
    #[error("landlock rule path {}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the ruleset or a rule.
    #[error("landlock ruleset")]
    Ruleset(#[from] landlock::RulesetError),
    /// The kernel has no Landlock (not built in, or not in the `lsm=` boot list).
    #[error("this kernel does not enforce Landlock (check that 'landlock' is in /sys/kernel/security/lsm)")]
    Unsupported,
}

/// How far the restriction went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enforcement {
    /// Every right was enforced (false: the kernel's Landlock is older and enforces fewer).
    pub full: bool,
    /// The restriction covers every thread of the process, not only the calling thread and
    /// the threads it starts later.
    pub all_threads: bool,
}

/// Whether the rule's opened path is a directory (a rule on a file may only carry file rights).
fn is_dir(fd: &PathFd, path: &Path) -> Result<bool, LandlockError> {
    let err = |source| LandlockError::Path {
        path: path.to_path_buf(),
        source,
    };
    // fstat of the O_PATH descriptor: the very file the rule is about.
    let file = std::fs::File::from(fd.as_fd().try_clone_to_owned().map_err(err)?);
    Ok(file.metadata().map_err(err)?.is_dir())
}

/// Restricts the calling thread (and the threads it starts from now on; every thread where
/// the kernel can) to `rules`: any other file-system access fails with EACCES.
///
/// # Errors
///
/// A rule's path cannot be opened, the kernel refuses the ruleset, or it has no Landlock.
pub fn restrict(rules: &[PathRule]) -> Result<Enforcement, LandlockError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_USED))?
        .create()?;
    for rule in rules {
        let fd = PathFd::new(&rule.path).map_err(|e| LandlockError::Path {
            path: rule.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut rights = rule.access.rights();
        if !is_dir(&fd, &rule.path)? {
            rights &= AccessFs::from_file(ABI_USED);
        }
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
    }
    let status = ruleset.all_threads(true)?.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(LandlockError::Unsupported);
    }
    // Partial enforcement also reports the all-threads flag a kernel before ABI 8 lacks: what
    // matters for the rights is whether the kernel knows every right asked for.
    let full = matches!(
        status.landlock,
        LandlockStatus::Available { effective_abi, .. } if effective_abi >= ABI_USED
    );
    log::info!(
        "landlock: {} rules, {} enforced, {}",
        rules.len(),
        if full { "fully" } else { "partially" },
        if status.all_threads {
            "every thread"
        } else {
            "this thread and its new threads"
        }
    );
    Ok(Enforcement {
        full,
        all_threads: status.all_threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn access_parses_cloud_hypervisors_values() {
        assert_eq!(Access::parse("r").ok(), Some(Access::Read));
        assert_eq!(Access::parse("w").ok(), Some(Access::Write));
        assert_eq!(Access::parse("rw").ok(), Some(Access::ReadWrite));
        for bad in ["", "x", "wr", "R", "rw "] {
            assert!(Access::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let err = restrict(&[PathRule::new("/nonexistent/nimbus-landlock", Access::Read)])
            .expect_err("missing path");
        assert!(
            err.to_string().contains("/nonexistent/nimbus-landlock"),
            "{err}"
        );
    }

    /// Restricts a fresh thread (Landlock is per thread where the kernel has no ABI 8), so the
    /// test process itself stays free.
    #[test]
    fn only_the_named_paths_stay_reachable() {
        let dir = std::env::temp_dir().join(format!("nimbus-landlock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("rw")).expect("dir");
        fs::write(dir.join("ro.txt"), b"read me").expect("file");
        fs::write(dir.join("outside.txt"), b"secret").expect("file");
        let d = dir.clone();
        let result = std::thread::spawn(move || {
            let rules = [
                PathRule::new(d.join("rw"), Access::ReadWrite),
                PathRule::new(d.join("ro.txt"), Access::Read),
            ];
            let enforcement = match restrict(&rules) {
                Err(LandlockError::Unsupported) => return None,
                other => other.expect("restrict"),
            };
            let denied = |r: std::io::Result<()>| {
                r.expect_err("outside the rules").raw_os_error() == Some(13)
            };
            Some((
                enforcement,
                fs::read(d.join("ro.txt")).ok(),
                denied(fs::write(d.join("ro.txt"), b"x")),
                denied(fs::read(d.join("outside.txt")).map(drop)),
                fs::write(d.join("rw/new.txt"), b"made").is_ok(),
                fs::read(d.join("rw/new.txt")).ok(),
            ))
        })
        .join()
        .expect("thread");
        let Some((enforcement, ro, ro_write_denied, outside_denied, made, read_back)) = result
        else {
            eprintln!("SKIPPED: this kernel has no Landlock");
            return;
        };
        let _ = fs::remove_dir_all(&dir);
        assert!(enforcement.full, "{enforcement:?}");
        assert_eq!(ro.as_deref(), Some(&b"read me"[..]));
        assert!(ro_write_denied, "writing a read-only file was allowed");
        assert!(outside_denied, "reading outside the rules was allowed");
        assert!(made, "creating a file in a rw directory failed");
        assert_eq!(read_back.as_deref(), Some(&b"made"[..]));
    }
}
