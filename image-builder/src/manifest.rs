//! The system manifest: `system.toml`, read, checked and compiled into the
//! `manifest` boot module (`ipc_schema::manifest`), which init reads.
//!
//! Every mistake is reported with the file and the field, before anything is
//! built: an unknown key, a duplicate name, a size out of range, a right an
//! object does not have, an endpoint nobody receives on. A manifest without
//! `[[service]]` tables gets the standard services (`standard-services.toml`).

use anyhow::{Context, Result, bail, ensure};
use ipc_schema::manifest::{
    self as compiled, MAX_DOMAINS, MAX_MODULE_NAME, MAX_NAME, MAX_SERVICE_HANDLES, MAX_SERVICES,
    MAX_SHARED, MAX_VCPUS,
};
use ipc_schema::syscall::rights;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The most RAM one domain gets, in MiB.
pub const MAX_DOMAIN_MIB: u32 = 4096;
/// The largest shared-frames object, in 4 KiB pages (16 MiB).
pub const MAX_SHARED_PAGES: u32 = 4096;
/// The standard services, for manifests that list none.
pub const STANDARD_SERVICES: &str = include_str!("standard-services.toml");
/// The endpoint init receives on (the supervisor interface).
pub const SUPERVISOR_ENDPOINT: &str = "supervisor";
/// Boot modules with a fixed meaning: no service or guest may use the names.
const RESERVED_MODULES: [&str; 2] = ["init", "manifest"];
/// The kernel's log UART (COM1): never granted.
const LOG_PORTS: std::ops::Range<u32> = 0x3f8..0x400;

/// The manifest as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SystemManifest {
    /// The system's name, shown at boot.
    pub name: String,
    /// Include the standard services (vmm, altp2m, console) besides the
    /// `[[service]]` tables; the default when there are none.
    #[serde(default)]
    pub standard_services: Option<bool>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub shared: Vec<SharedSpec>,
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainSpec>,
    /// What a reserved region (RMRR) meeting a domain's RAM does: "strict"
    /// (default: the build fails, naming it) or "relaxed" (a warning).
    #[serde(default)]
    pub rmrr_policy: Option<String>,
    /// Where it was read from (not part of the file).
    #[serde(skip)]
    pub path: PathBuf,
}

/// One `[[service]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Its name (logs, `cargo hv ctl`, `--service NAME=PATH`) and boot module.
    pub name: String,
    /// The crate it is built from: `services/<crate>` (default: the name).
    #[serde(default, rename = "crate")]
    pub krate: Option<String>,
    /// `restart` (default) or `hold`.
    #[serde(default = "restart")]
    pub on_fault: String,
    #[serde(default = "three")]
    pub max_restarts: u32,
    #[serde(default = "ten_seconds")]
    pub restart_window_ms: u32,
    /// A task: runs to completion and is not restarted (see the compiled
    /// manifest).
    #[serde(default)]
    pub task: bool,
    #[serde(default)]
    pub handles: Vec<HandleToml>,
    /// The domains whose memory this service, a device backend, may have
    /// mapped for DMA by the `iommu` service (IO-5; docs/iommu.md).
    #[serde(default)]
    pub dma_clients: Vec<String>,
}

/// One handle: its name, exactly one object, its rights.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HandleToml {
    pub name: String,
    pub endpoint: Option<String>,
    pub notification: Option<String>,
    pub shared: Option<String>,
    pub domains: Option<bool>,
    /// One domain of the manifest, by name.
    pub domain: Option<String>,
    /// `[base, count]`.
    pub io_ports: Option<[u32; 2]>,
    pub irq: Option<u8>,
    /// One PCI function, `"00:03.0"` or `"0000:00:03.0"`.
    pub device: Option<String>,
    /// Every DMA-remapping unit (`iommu = true`: the iommu service's).
    pub iommu: Option<bool>,
    pub rights: Vec<String>,
}

/// One `[[shared]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SharedSpec {
    pub name: String,
    pub pages: u32,
}

/// One `[[domain]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    pub name: String,
    /// The guest image: a guest crate in `tests/guests/<guest>`.
    #[serde(default)]
    pub guest: Option<String>,
    /// Or the user's own multiboot kernel: a file, relative to the
    /// manifest's folder (docs/guests.md).
    #[serde(default)]
    pub kernel: Option<String>,
    /// Multiboot modules for the kernel, in order (docs/guests.md).
    #[serde(default)]
    pub modules: Vec<ModuleSpec>,
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub vcpus: u8,
    #[serde(default)]
    pub cmdline: String,
    /// The endpoint its exits go to.
    #[serde(default = "exits")]
    pub exits: String,
    /// The endpoint its EPT violations go to.
    #[serde(default = "violations")]
    pub violations: String,
    /// Who may introspect it, and how (docs/manifest.md): absent, the host
    /// (the `console`) may do everything and no service anything.
    pub introspection: Option<Vec<IntrospectorSpec>>,
    /// Not started or unpaused while services hold foreign mappings of its
    /// memory (FM-2).
    #[serde(default)]
    pub protected: bool,
    /// PCI functions assigned to it (docs/iommu.md).
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// `"host"`: the host's reserved layout (RMRR-2).
    #[serde(default)]
    pub rmrr: Option<String>,
}

/// A device of a domain: its address, or a table with its own RMRR policy.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum DeviceSpec {
    Address(String),
    Table(DeviceTable),
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceTable {
    pub device: String,
    pub rmrr_policy: Option<String>,
}

impl DeviceSpec {
    pub fn address(&self) -> &str {
        match self {
            DeviceSpec::Address(a) => a,
            DeviceSpec::Table(t) => &t.device,
        }
    }
}

/// `rmrr_policy` as "relaxed" (true) or "strict" (false).
fn relaxed(policy: Option<&str>, default: bool) -> Result<bool> {
    match policy {
        None => Ok(default),
        Some("strict") => Ok(false),
        Some("relaxed") => Ok(true),
        Some(other) => bail!("rmrr_policy = {other:?}: it is \"strict\" or \"relaxed\""),
    }
}

/// One multiboot module of a domain's kernel.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModuleSpec {
    /// A file, relative to the manifest's folder.
    pub path: String,
    /// What the kernel finds after the file's name in the module's string.
    #[serde(default)]
    pub cmdline: String,
}

/// One entry of a domain's `introspection`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IntrospectorSpec {
    /// A service of the manifest (`console` for the host).
    pub service: String,
    /// `read`, `write`, `views`, `events`.
    pub rights: Vec<String>,
}

impl DomainSpec {
    /// The boot module of its `i`-th multiboot module.
    pub fn module_module(&self, i: usize) -> String {
        format!("mod{i}-{}", self.name)
    }

    /// The string its kernel finds for multiboot module `i`: the file's
    /// name, then the module's command line (as `qemu -initrd` gives it).
    pub fn module_string(&self, i: usize) -> String {
        let m = &self.modules[i];
        let file = Path::new(&m.path)
            .file_name()
            .map_or_else(|| m.path.clone(), |f| f.to_string_lossy().into_owned());
        if m.cmdline.is_empty() {
            file
        } else {
            format!("{file} {}", m.cmdline)
        }
    }

    /// The boot module of its image: the guest crate's name, or
    /// `kernel-<domain>` for a kernel from a file.
    pub fn module(&self) -> String {
        match (&self.guest, &self.kernel) {
            (Some(g), _) => g.clone(),
            (None, _) => format!("kernel-{}", self.name),
        }
    }

    /// Its introspectors as (service, rights bits): the manifest's, or the
    /// host alone with every right.
    pub fn introspectors(&self) -> Result<Vec<(&str, u8)>> {
        use ipc_schema::manifest::introspection;
        let Some(list) = &self.introspection else {
            return Ok(vec![("console", introspection::ALL)]);
        };
        list.iter()
            .map(|i| {
                let mut bits = 0;
                for r in &i.rights {
                    bits |= introspection::NAMES
                        .iter()
                        .find(|(n, _)| n == r)
                        .map(|(_, b)| *b)
                        .with_context(|| {
                            format!(
                                "introspection of `{}`: no right `{r}` (read, write, views, events)",
                                i.service
                            )
                        })?;
                }
                Ok((i.service.as_str(), bits))
            })
            .collect()
    }
}

fn one() -> u8 {
    1
}
fn three() -> u32 {
    3
}
fn ten_seconds() -> u32 {
    10_000
}
fn restart() -> String {
    "restart".to_owned()
}
fn exits() -> String {
    "exits".to_owned()
}
fn violations() -> String {
    "violations".to_owned()
}

/// What a checked handle grants.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Object<'a> {
    Endpoint(&'a str),
    Notification(&'a str),
    Shared(&'a str),
    Domains,
    Domain(&'a str),
    IoPorts { base: u16, count: u16 },
    Irq(u8),
    Iommu,
    Device(compiled::PciDevice),
}

/// A PCI address of the manifest, or an error naming it.
fn pci(text: &str) -> Result<compiled::PciDevice> {
    compiled::PciDevice::parse(text).with_context(|| {
        format!(
            "device {text:?} is not a PCI address (bus:device.function or segment:bus:device.function, in hex, e.g. \"00:03.0\")"
        )
    })
}

impl<'a> Object<'a> {
    /// The rights that mean something for this kind of object.
    fn rights(&self) -> &'static [&'static str] {
        match self {
            Object::Endpoint(_) => &["call", "receive"],
            Object::Notification(_) => &["signal", "wait"],
            Object::Shared(_) => &["read", "write"],
            Object::Domains | Object::Domain(_) => &["read", "write", "build", "views", "vcpus"],
            Object::IoPorts { .. } | Object::Irq(_) | Object::Device(_) => &["device"],
            Object::Iommu => &["create", "device"],
        }
    }

    fn compiled(&self) -> compiled::Object<'a> {
        match *self {
            Object::Endpoint(n) => compiled::Object::Endpoint(n),
            Object::Notification(n) => compiled::Object::Notification(n),
            Object::Shared(n) => compiled::Object::Shared(n),
            Object::Domains => compiled::Object::Domains,
            Object::Domain(n) => compiled::Object::Domain(n),
            Object::IoPorts { base, count } => compiled::Object::IoPorts { base, count },
            Object::Irq(l) => compiled::Object::Irq(l),
            Object::Iommu => compiled::Object::Iommu,
            Object::Device(d) => compiled::Object::Device(d),
        }
    }
}

impl HandleToml {
    fn object(&self) -> Result<Object<'_>> {
        let mut found = Vec::new();
        if let Some(e) = &self.endpoint {
            found.push(Object::Endpoint(e));
        }
        if let Some(n) = &self.notification {
            found.push(Object::Notification(n));
        }
        if let Some(s) = &self.shared {
            found.push(Object::Shared(s));
        }
        match self.domains {
            Some(true) => found.push(Object::Domains),
            Some(false) => bail!("`domains = false` grants nothing: leave the handle out"),
            None => {}
        }
        if let Some(d) = &self.domain {
            found.push(Object::Domain(d));
        }
        if let Some([base, count]) = self.io_ports {
            ensure!(
                count >= 1 && base + count <= 0x1_0000,
                "io_ports = [{base:#x}, {count}] is not a range of ports (0 to 0xffff, at least one)"
            );
            ensure!(
                base + count <= LOG_PORTS.start || base >= LOG_PORTS.end,
                "io_ports = [{base:#x}, {count}] includes COM1 (0x3f8-0x3ff), which carries the kernel's log"
            );
            found.push(Object::IoPorts {
                base: base as u16,
                count: count as u16,
            });
        }
        if let Some(line) = self.irq {
            ensure!(
                line < 16,
                "irq = {line}: only ISA lines 0 to 15 can be granted"
            );
            found.push(Object::Irq(line));
        }
        if let Some(d) = &self.device {
            found.push(Object::Device(pci(d)?));
        }
        match self.iommu {
            Some(true) => found.push(Object::Iommu),
            Some(false) => bail!("`iommu = false` grants nothing: leave the handle out"),
            None => {}
        }
        ensure!(
            found.len() == 1,
            "a handle names exactly one object (endpoint, notification, shared, domains, domain, io_ports, irq, device or iommu); this one names {}",
            found.len()
        );
        Ok(found.remove(0))
    }

    fn rights_bits(&self, object: &Object<'_>) -> Result<u32> {
        ensure!(!self.rights.is_empty(), "rights = [] grants nothing");
        let mut bits = 0;
        for r in &self.rights {
            let bit = rights::by_name(r).with_context(|| {
                let all: Vec<&str> = rights::NAMES.iter().map(|(n, _)| *n).collect();
                format!("unknown right {r:?} (rights are {})", all.join(", "))
            })?;
            ensure!(
                object.rights().contains(&r.as_str()),
                "right {r:?} means nothing for this object (it takes {})",
                object.rights().join(", ")
            );
            bits |= bit;
        }
        Ok(bits)
    }
}

impl ServiceSpec {
    /// The crate directory name under `services/`.
    pub fn crate_name(&self) -> &str {
        self.krate.as_deref().unwrap_or(&self.name)
    }

    fn disposition(&self) -> Result<compiled::Disposition> {
        match self.on_fault.as_str() {
            "restart" => Ok(compiled::Disposition::Restart),
            "hold" => Ok(compiled::Disposition::Hold),
            other => bail!("on_fault = {other:?}: it is \"restart\" or \"hold\""),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Standard {
    service: Vec<ServiceSpec>,
    shared: Vec<SharedSpec>,
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
        if m.standard_services.unwrap_or(m.services.is_empty()) {
            let standard: Standard =
                toml::from_str(STANDARD_SERVICES).context("the standard services do not parse")?;
            let own = std::mem::take(&mut m.services);
            m.services = standard.service;
            m.services.extend(own);
            for s in standard.shared {
                if !m.shared.iter().any(|t| t.name == s.name) {
                    m.shared.push(s);
                }
            }
        }
        m.check()
            .with_context(|| format!("{} is not a valid manifest", path.display()))?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        check_name("the system name", &self.name, MAX_NAME)?;
        ensure!(
            self.services.len() <= MAX_SERVICES,
            "{} services, but a system runs at most {MAX_SERVICES} (besides init)",
            self.services.len()
        );
        ensure!(
            self.shared.len() <= MAX_SHARED,
            "{} shared objects, but a system has at most {MAX_SHARED}",
            self.shared.len()
        );
        ensure!(
            self.domains.len() <= MAX_DOMAINS,
            "{} domains, but a system runs at most {MAX_DOMAINS}",
            self.domains.len()
        );
        for (i, s) in self.shared.iter().enumerate() {
            let what = format!("shared object `{}`", s.name);
            check_name(&format!("the name of {what}"), &s.name, MAX_NAME)?;
            ensure!(
                !self.shared[..i].iter().any(|t| t.name == s.name),
                "{what}: another shared object has the same name"
            );
            ensure!(
                (1..=MAX_SHARED_PAGES).contains(&s.pages),
                "{what}: pages = {} is out of range (1 to {MAX_SHARED_PAGES})",
                s.pages
            );
        }
        for (i, s) in self.services.iter().enumerate() {
            self.check_service(i, s)
                .with_context(|| format!("service {} (`{}`)", i + 1, s.name))?;
        }
        for (i, d) in self.domains.iter().enumerate() {
            self.check_domain(i, d)
                .with_context(|| format!("domain {} (`{}`)", i + 1, d.name))?;
        }
        self.check_devices()?;
        self.check_endpoints()
    }

    /// Each PCI function goes to one owner: a domain (`devices`) or a
    /// service (a `device` handle), never two (issue 12, point 9).
    fn check_devices(&self) -> Result<()> {
        let mut owners: Vec<(compiled::PciDevice, String, &str)> = Vec::new();
        let domains = self.domains.iter().flat_map(|d| {
            d.devices
                .iter()
                .map(move |t| (t.address(), format!("domain `{}`", d.name)))
        });
        let services = self.services.iter().flat_map(|s| {
            s.handles
                .iter()
                .filter_map(|h| h.device.as_deref())
                .map(move |t| (t, format!("service `{}`", s.name)))
        });
        for (text, owner) in domains.chain(services) {
            let d = pci(text)?;
            if let Some((_, other, first)) = owners.iter().find(|(e, _, _)| *e == d) {
                bail!(
                    "device {text:?} is assigned twice: to {other} and to {owner}{}",
                    if *first == text {
                        String::new()
                    } else {
                        format!(" (as {first:?})")
                    }
                );
            }
            owners.push((d, owner, text));
        }
        Ok(())
    }

    fn check_service(&self, i: usize, s: &ServiceSpec) -> Result<()> {
        check_name("the name", &s.name, MAX_MODULE_NAME)?;
        check_name("the crate", s.crate_name(), MAX_NAME)?;
        ensure!(
            !RESERVED_MODULES.contains(&s.name.as_str()),
            "the name `{}` is reserved for the boot module of the same name",
            s.name
        );
        ensure!(
            !self.services[..i].iter().any(|t| t.name == s.name),
            "another service has the same name"
        );
        ensure!(
            !self.domains.iter().any(|d| d.module() == s.name
                || (0..d.modules.len()).any(|i| d.module_module(i) == s.name)),
            "a domain's guest image has the same name: boot modules are named after services and guests, so rename one"
        );
        s.disposition()?;
        for (j, c) in s.dma_clients.iter().enumerate() {
            ensure!(
                self.domains.iter().any(|d| &d.name == c),
                "dma_clients: no [[domain]] is named `{c}`"
            );
            ensure!(
                !s.dma_clients[..j].contains(c),
                "dma_clients: `{c}` is named twice"
            );
        }
        ensure!(
            s.handles.len() <= MAX_SERVICE_HANDLES,
            "{} handles, but a service starts with at most {MAX_SERVICE_HANDLES}",
            s.handles.len()
        );
        for (j, h) in s.handles.iter().enumerate() {
            let what = format!("handle `{}`", h.name);
            check_name(&format!("the name of {what}"), &h.name, MAX_NAME)?;
            ensure!(
                h.name != "lifecycle" && !h.name.starts_with("module"),
                "{what}: the name is reserved (init gives every service its `lifecycle` handle)"
            );
            ensure!(
                !s.handles[..j].iter().any(|o| o.name == h.name),
                "{what}: another handle of this service has the same name"
            );
            let object = h.object().with_context(|| what.clone())?;
            h.rights_bits(&object).with_context(|| what.clone())?;
            if let Object::Shared(n) = object {
                ensure!(
                    self.shared.iter().any(|t| t.name == n),
                    "{what}: no [[shared]] object is named `{n}`"
                );
            }
            if let Object::Domain(n) = object {
                ensure!(
                    self.domains.iter().any(|d| d.name == n),
                    "{what}: no [[domain]] is named `{n}`"
                );
            }
            if object == Object::Iommu {
                ensure!(
                    h.rights.iter().all(|r| r == "create" || r == "device"),
                    "{what}: the iommu handle takes create and device"
                );
            }
            if object == Object::Endpoint(SUPERVISOR_ENDPOINT) {
                ensure!(
                    !h.rights.iter().any(|r| r == "receive"),
                    "{what}: init receives on the `{SUPERVISOR_ENDPOINT}` endpoint; services may only call it"
                );
            }
        }
        Ok(())
    }

    fn check_domain(&self, i: usize, d: &DomainSpec) -> Result<()> {
        check_name("the name", &d.name, MAX_NAME)?;
        match (&d.guest, &d.kernel) {
            (Some(_), Some(_)) => bail!("both guest and kernel are given: a domain runs one image"),
            (None, None) => bail!(
                "no image: give guest = \"NAME\" (a guest crate) or kernel = \"PATH\" (a multiboot kernel)"
            ),
            (None, Some(k)) => ensure!(!k.is_empty(), "kernel = \"\" names no file"),
            (Some(_), None) => {}
        }
        ensure!(
            d.modules.is_empty() || d.kernel.is_some(),
            "modules are for a kernel from a file (kernel = \"PATH\"), not a guest crate"
        );
        ensure!(
            d.modules.len() <= compiled::MAX_GUEST_MODULES,
            "{} modules: a kernel gets at most {}",
            d.modules.len(),
            compiled::MAX_GUEST_MODULES
        );
        for (i, m) in d.modules.iter().enumerate() {
            ensure!(!m.path.is_empty(), "module {i}: path = \"\" names no file");
            check_name("the module", &d.module_module(i), MAX_MODULE_NAME)?;
            ensure!(
                m.cmdline.len() <= 200,
                "module {i}: the cmdline is longer than 200 bytes"
            );
        }
        let module = d.module();
        check_name("the guest", &module, MAX_MODULE_NAME)?;
        ensure!(
            !RESERVED_MODULES.contains(&module.as_str()),
            "the guest name `{module}` is reserved for the boot module of the same name"
        );
        ensure!(
            !self.domains[..i].iter().any(|e| e.name == d.name),
            "another domain has the same name"
        );
        ensure!(
            (1..=MAX_DOMAIN_MIB).contains(&d.memory_mib),
            "memory_mib = {} is out of range (1 to {MAX_DOMAIN_MIB})",
            d.memory_mib
        );
        ensure!(
            (1..=MAX_VCPUS).contains(&d.vcpus),
            "vcpus = {} is out of range (1 to {MAX_VCPUS})",
            d.vcpus
        );
        ensure!(
            d.cmdline.len() <= 200,
            "the cmdline is longer than 200 bytes"
        );
        ensure!(
            d.devices.len() <= compiled::MAX_DOMAIN_DEVICES,
            "{} devices: a domain is assigned at most {}",
            d.devices.len(),
            compiled::MAX_DOMAIN_DEVICES
        );
        let global = relaxed(self.rmrr_policy.as_deref(), false)?;
        for t in &d.devices {
            pci(t.address())?;
            if let DeviceSpec::Table(t) = t {
                relaxed(t.rmrr_policy.as_deref(), global)
                    .with_context(|| format!("device {:?}", t.device))?;
            }
        }
        ensure!(
            matches!(d.rmrr.as_deref(), None | Some("host")),
            "rmrr = {:?}: the only value is \"host\" (the host's reserved layout)",
            d.rmrr.as_deref().unwrap_or_default()
        );
        for (field, ep) in [("exits", &d.exits), ("violations", &d.violations)] {
            ensure!(
                !self.receivers(ep).is_empty(),
                "{field} = {ep:?}: no service receives on endpoint `{ep}`"
            );
        }
        let introspectors = d.introspectors()?;
        for (j, (service, _)) in introspectors.iter().enumerate() {
            // The default names the console, which a system may lack.
            ensure!(
                d.introspection.is_none() || self.services.iter().any(|s| s.name == *service),
                "introspection: no service is named `{service}`"
            );
            ensure!(
                !introspectors[..j].iter().any(|(t, _)| t == service),
                "introspection: `{service}` is named twice"
            );
        }
        Ok(())
    }

    /// The services that receive on endpoint `name`, once per handle.
    fn receivers(&self, name: &str) -> Vec<&str> {
        self.services
            .iter()
            .flat_map(|s| {
                s.handles
                    .iter()
                    .filter(move |h| {
                        h.endpoint.as_deref() == Some(name)
                            && h.rights.iter().any(|r| r == "receive")
                    })
                    .map(move |_| s.name.as_str())
            })
            .collect()
    }

    /// Every endpoint has exactly one receiver (init for `supervisor`).
    fn check_endpoints(&self) -> Result<()> {
        let mut names: Vec<&str> = self
            .services
            .iter()
            .flat_map(|s| s.handles.iter().filter_map(|h| h.endpoint.as_deref()))
            .collect();
        names.sort_unstable();
        names.dedup();
        for n in names {
            let r = self.receivers(n);
            if n == SUPERVISOR_ENDPOINT {
                continue;
            }
            ensure!(
                !r.is_empty(),
                "nobody receives on endpoint `{n}`: calls to it would wait forever (give one service `rights = [\"receive\"]` on it)"
            );
            ensure!(
                r.len() == 1,
                "endpoint `{n}` has {} receivers ({}): an endpoint has exactly one",
                r.len(),
                r.join(", ")
            );
        }
        Ok(())
    }

    /// The compiled `manifest` boot module.
    pub fn compile(&self) -> Result<Vec<u8>> {
        let full = |what: &str| anyhow::anyhow!("too many {what}");
        let mut services = heapless::Vec::new();
        for s in &self.services {
            let mut handles = heapless::Vec::new();
            for h in &s.handles {
                let object = h.object()?;
                let rights = h.rights_bits(&object)?;
                let object = object.compiled();
                handles
                    .push(compiled::HandleSpec {
                        name: &h.name,
                        object,
                        rights,
                    })
                    .map_err(|_| full("handles"))?;
            }
            services
                .push(compiled::Service {
                    name: &s.name,
                    module: &s.name,
                    disposition: s.disposition()?,
                    max_restarts: s.max_restarts,
                    restart_window_ms: s.restart_window_ms,
                    task: s.task,
                    handles,
                    dma_clients: self
                        .domains
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| s.dma_clients.contains(&d.name))
                        .fold(0, |bits, (i, _)| bits | 1 << i),
                })
                .map_err(|_| full("services"))?;
        }
        let mut shared = heapless::Vec::new();
        for s in &self.shared {
            shared
                .push(compiled::Shared {
                    name: &s.name,
                    pages: s.pages,
                })
                .map_err(|_| full("shared objects"))?;
        }
        let modules: Vec<String> = self.domains.iter().map(DomainSpec::module).collect();
        let kmods: Vec<Vec<(String, String)>> = self
            .domains
            .iter()
            .map(|d| {
                (0..d.modules.len())
                    .map(|i| (d.module_module(i), d.module_string(i)))
                    .collect()
            })
            .collect();
        let global = relaxed(self.rmrr_policy.as_deref(), false)?;
        let mut domains = heapless::Vec::new();
        for ((d, module), kmods) in self.domains.iter().zip(&modules).zip(&kmods) {
            domains
                .push(compiled::Domain {
                    name: &d.name,
                    guest: module,
                    memory_mib: d.memory_mib,
                    vcpus: d.vcpus,
                    cmdline: &d.cmdline,
                    exits: &d.exits,
                    violations: &d.violations,
                    introspection: d
                        .introspectors()?
                        .into_iter()
                        .map(|(service, rights)| compiled::Introspector { service, rights })
                        .collect(),
                    protected: d.protected,
                    modules: kmods
                        .iter()
                        .map(|(module, cmdline)| compiled::GuestModule { module, cmdline })
                        .collect(),
                    devices: d
                        .devices
                        .iter()
                        .map(|t| {
                            let own = match t {
                                DeviceSpec::Table(t) => t.rmrr_policy.as_deref(),
                                DeviceSpec::Address(_) => None,
                            };
                            Ok(compiled::DomainDevice {
                                device: pci(t.address())?,
                                rmrr_relaxed: relaxed(own, global)?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?
                        .into_iter()
                        .collect(),
                    rmrr_host: d.rmrr.is_some(),
                    rmrr_relaxed: global,
                })
                .map_err(|_| full("domains"))?;
        }
        let m = compiled::Manifest {
            name: &self.name,
            services,
            shared,
            domains,
        };
        let mut buf = vec![0u8; 64 * 1024];
        let n = m.encode(&mut buf).context("encoding the manifest")?.len();
        buf.truncate(n);
        Ok(buf)
    }

    /// The guest crates the domains use, each once.
    pub fn guests(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for d in &self.domains {
            if let Some(g) = &d.guest
                && !out.contains(&g.as_str())
            {
                out.push(g);
            }
        }
        out
    }

    /// The domains that run a kernel from a file: (domain, the file's
    /// path, relative ones resolved against the manifest's folder).
    pub fn kernels(&self) -> Vec<(&DomainSpec, PathBuf)> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.domains
            .iter()
            .filter_map(|d| Some((d, dir.join(d.kernel.as_ref()?))))
            .collect()
    }

    /// The multiboot modules of the kernels: (domain, index, the file's
    /// path, resolved as the kernel's).
    pub fn kernel_modules(&self) -> Vec<(&DomainSpec, usize, PathBuf)> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.domains
            .iter()
            .flat_map(|d| {
                d.modules
                    .iter()
                    .enumerate()
                    .map(move |(i, m)| (d, i, dir.join(&m.path)))
            })
            .collect()
    }
}

/// Names of systems, services, domains, guests, handles and objects: 1 to
/// `max` characters, lower-case letters, digits and `-`, starting with a
/// letter (they appear on GRUB command lines and in logs).
fn check_name(what: &str, name: &str, max: usize) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ensure!(
        ok,
        "{what} is {name:?}: names are 1 to {max} lower-case letters, digits and '-', starting with a letter"
    );
    Ok(())
}

#[cfg(test)]
mod tests;
