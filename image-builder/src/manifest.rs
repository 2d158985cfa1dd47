//! The system manifest: `system.toml`, read, checked and compiled into the
//! `manifest` boot module (`ipc_schema::manifest`).
//!
//! Every mistake is reported with the file and the field, before anything is
//! built: an unknown key, a duplicate name, a size out of range.

use anyhow::{Context, Result, bail, ensure};
use ipc_schema::manifest::{self as compiled, MAX_DOMAINS, MAX_NAME, MAX_VCPUS};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The most RAM one domain gets, in MiB.
pub const MAX_DOMAIN_MIB: u32 = 4096;

/// The manifest as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SystemManifest {
    /// The system's name, shown at boot.
    pub name: String,
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainSpec>,
    /// Where it was read from (not part of the file).
    #[serde(skip)]
    pub path: PathBuf,
}

/// One `[[domain]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    pub name: String,
    /// The guest image: a guest crate in `tests/guests/<guest>`.
    pub guest: String,
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub vcpus: u8,
    #[serde(default)]
    pub cmdline: String,
}

fn one() -> u8 {
    1
}

impl SystemManifest {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the manifest {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses and checks manifest text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut m: SystemManifest = toml::from_str(text)
            .with_context(|| format!("{} is not a valid manifest", path.display()))?;
        m.path = path.to_owned();
        m.check()
            .with_context(|| format!("{} is not a valid manifest", path.display()))?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        check_name("the system name", &self.name)?;
        ensure!(
            self.domains.len() <= MAX_DOMAINS,
            "{} domains, but a system runs at most {MAX_DOMAINS}",
            self.domains.len()
        );
        for (i, d) in self.domains.iter().enumerate() {
            let what = format!("domain {} (`{}`)", i + 1, d.name);
            check_name(&format!("the name of {what}"), &d.name)?;
            check_name(&format!("the guest of {what}"), &d.guest)?;
            if self.domains[..i].iter().any(|e| e.name == d.name) {
                bail!("{what}: another domain has the same name");
            }
            ensure!(
                (1..=MAX_DOMAIN_MIB).contains(&d.memory_mib),
                "{what}: memory_mib = {} is out of range (1 to {MAX_DOMAIN_MIB})",
                d.memory_mib
            );
            ensure!(
                (1..=MAX_VCPUS).contains(&d.vcpus),
                "{what}: vcpus = {} is out of range (1 to {MAX_VCPUS})",
                d.vcpus
            );
            ensure!(
                d.cmdline.len() <= 200,
                "{what}: the cmdline is longer than 200 bytes"
            );
        }
        Ok(())
    }

    /// The compiled `manifest` boot module.
    pub fn compile(&self) -> Result<Vec<u8>> {
        let mut domains = heapless::Vec::new();
        for d in &self.domains {
            domains
                .push(compiled::Domain {
                    name: &d.name,
                    guest: &d.guest,
                    memory_mib: d.memory_mib,
                    vcpus: d.vcpus,
                    cmdline: &d.cmdline,
                })
                .map_err(|_| anyhow::anyhow!("too many domains"))?;
        }
        let m = compiled::Manifest {
            name: &self.name,
            domains,
        };
        let mut buf = vec![0u8; 64 * 1024];
        let n = m.encode(&mut buf).context("encoding the manifest")?.len();
        buf.truncate(n);
        Ok(buf)
    }

    /// The guest images the domains use, each once.
    pub fn guests(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for d in &self.domains {
            if !out.contains(&d.guest.as_str()) {
                out.push(&d.guest);
            }
        }
        out
    }
}

/// Names of systems, domains, guests and modules: 1 to 32 characters, lower
/// case letters, digits and `-`, starting with a letter (they appear on GRUB
/// command lines and in logs).
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ensure!(
        ok,
        "{what} is {name:?}: names are 1 to {MAX_NAME} lower-case letters, digits and '-', starting with a letter"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::manifest::Manifest;

    fn parse(text: &str) -> Result<SystemManifest> {
        SystemManifest::parse(text, Path::new("test.toml"))
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn compiles_what_the_kernel_reads() {
        let m = parse(
            r#"
            name = "demo"
            [[domain]]
            name = "one"
            guest = "hello"
            memory_mib = 16
            [[domain]]
            name = "two"
            guest = "hello"
            memory_mib = 32
            vcpus = 2
            cmdline = "verbose"
            "#,
        )
        .unwrap();
        assert_eq!(m.guests(), ["hello"]);
        let bytes = m.compile().unwrap();
        let k = Manifest::decode(&bytes).unwrap();
        assert_eq!(k.name, "demo");
        assert_eq!(k.domains.len(), 2);
        assert_eq!(
            (
                k.domains[1].memory_mib,
                k.domains[1].vcpus,
                k.domains[1].cmdline
            ),
            (32, 2, "verbose")
        );
        assert_eq!(k.domains[0].vcpus, 1, "vcpus defaults to 1");
    }

    #[test]
    fn a_system_may_have_no_domains() {
        assert!(parse("name = \"empty\"").unwrap().domains.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let e = error("name = \"x\"\n[[domain]]\nname = \"a\"\nguest = \"g\"\nmemory_mib = 0\n");
        assert!(
            e.contains("test.toml") && e.contains("domain 1 (`a`): memory_mib = 0"),
            "{e}"
        );

        let e = error(
            "name = \"x\"\n[[domain]]\nname = \"a\"\nguest = \"g\"\nmemory_mib = 1\nvcpus = 99\n",
        );
        assert!(e.contains("vcpus = 99 is out of range"), "{e}");

        let e = error("name = \"x\"\ncolour = \"blue\"\n");
        assert!(e.contains("unknown field `colour`"), "{e}");

        let e = error("name = \"x\"\n[[domain]]\nname = \"a\"\nmemory_mib = 1\n");
        assert!(e.contains("missing field `guest`"), "{e}");

        let e = error("name = \"Bad Name\"");
        assert!(e.contains("the system name is \"Bad Name\""), "{e}");

        let two = "[[domain]]\nname = \"a\"\nguest = \"g\"\nmemory_mib = 1\n";
        let e = error(&format!("name = \"x\"\n{two}{two}"));
        assert!(
            e.contains("domain 2 (`a`): another domain has the same name"),
            "{e}"
        );

        let e = error("name = \"x\"\n[[domain]\n");
        assert!(e.contains("test.toml is not a valid manifest"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = format!(
            "{:#}",
            SystemManifest::load(Path::new("/nonexistent/system.toml")).unwrap_err()
        );
        assert!(
            e.contains("cannot read the manifest /nonexistent/system.toml"),
            "{e}"
        );
    }
}
