//! The compiled system manifest: the boot module `manifest`.
//!
//! People write `system.toml` (see docs/manifest.md); the image builder
//! checks it and compiles it to this form, which the kernel reads at boot
//! without an allocator (strings borrow from the module's bytes):
//!
//! ```text
//! "PLXM" | schema key (8 bytes) | postcard(Manifest)
//! ```
//!
//! A module without the magic, with another schema key, or whose body does
//! not decode is refused with an error that names which of the three it was.

use heapless::Vec;
use postcard_schema::{Schema, key::Key};
use serde::{Deserialize, Serialize};

/// First bytes of a compiled manifest.
pub const MAGIC: [u8; 4] = *b"PLXM";
/// The most domains one system runs.
pub const MAX_DOMAINS: usize = 16;
/// The most services one system runs (besides init).
pub const MAX_SERVICES: usize = 16;
/// The most handles the manifest gives one service.
pub const MAX_SERVICE_HANDLES: usize = 16;
/// The most shared-frame objects.
pub const MAX_SHARED: usize = 8;
/// The longest name of a domain or a handle.
pub const MAX_NAME: usize = 32;
/// The longest name of a boot module (a service or a guest image): it must
/// fit in a handle name after `module:`.
pub const MAX_MODULE_NAME: usize = 24;
/// The most vCPUs one domain has.
pub const MAX_VCPUS: u8 = 8;
/// Multiboot modules a guest kernel gets at most.
pub const MAX_GUEST_MODULES: usize = 8;

/// The whole system. Init (the supervisor) reads it; the kernel does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Manifest<'a> {
    /// The system's name, shown at boot.
    pub name: &'a str,
    pub services: Vec<Service<'a>, MAX_SERVICES>,
    pub shared: Vec<Shared<'a>, MAX_SHARED>,
    pub domains: Vec<Domain<'a>, MAX_DOMAINS>,
}

/// One service: its ELF (a boot module), what to do when it faults, and the
/// handles it starts with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Service<'a> {
    pub name: &'a str,
    /// The boot module holding its ELF.
    pub module: &'a str,
    pub disposition: Disposition,
    /// At most this many restarts within `restart_window_ms`; one more and the
    /// service is held instead.
    pub max_restarts: u32,
    pub restart_window_ms: u32,
    /// A task runs to completion (EXIT with a code, 0 for success) and is
    /// not restarted; the system halts once every domain and every task
    /// has ended.
    pub task: bool,
    pub handles: Vec<HandleSpec<'a>, MAX_SERVICE_HANDLES>,
    /// The domains whose memory this service (a device backend) may have
    /// mapped for DMA by the `iommu` service at start (IO-5; changed at run
    /// time through the `iommu-admin` endpoint): bit `i` is the manifest's
    /// `i`-th domain (a bit set, so the manifest stays small on init's
    /// stack).
    pub dma_clients: u16,
}

/// What the supervisor does with a service that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Disposition {
    /// Start it again (a new generation), within the rate limit.
    Restart,
    /// Leave it stopped, for inspection.
    Hold,
}

/// One handle a service starts with: the name it finds it under, the object,
/// the rights (`syscall::rights` bits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct HandleSpec<'a> {
    pub name: &'a str,
    pub object: Object<'a>,
    pub rights: u32,
}

/// Objects the manifest can give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub enum Object<'a> {
    /// An endpoint, by name (created once, whoever names it).
    Endpoint(&'a str),
    Notification(&'a str),
    /// Shared frames, by name (see [`Shared`]).
    Shared(&'a str),
    /// Every guest domain.
    Domains,
    /// One domain of the manifest, by name.
    Domain(&'a str),
    /// I/O ports `base .. base + count`.
    IoPorts {
        base: u16,
        count: u16,
    },
    /// A legacy (ISA) interrupt line.
    Irq(u8),
    /// Every DMA-remapping unit: creating IoSpaces, attaching devices,
    /// reading faults (the `iommu` service's).
    Iommu,
    /// One PCI function: its memory BARs, and (for the `iommu` service)
    /// attaching it.
    Device(PciDevice),
}

/// A PCI function: segment and source id (bus << 8 | device << 3 |
/// function), as the manifest writes `"00:03.0"` or `"0000:00:03.0"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PciDevice {
    pub segment: u16,
    pub source: u16,
}

impl PciDevice {
    /// Parses `bus:device.function` or `segment:bus:device.function` (hex
    /// fields; device below 0x20, function below 8).
    pub fn parse(text: &str) -> Option<Self> {
        let (rest, function) = text.rsplit_once('.')?;
        let mut parts = rest.rsplitn(3, ':');
        let device = parts.next()?;
        let bus = parts.next()?;
        let segment = parts.next().unwrap_or("0");
        let hex = |s: &str, max: u32| {
            (!s.is_empty() && s.len() <= 4)
                .then(|| u32::from_str_radix(s, 16).ok())
                .flatten()
                .filter(|v| *v <= max)
        };
        let (segment, bus, device, function) = (
            hex(segment, 0xffff)?,
            hex(bus, 0xff)?,
            hex(device, 0x1f)?,
            hex(function, 7)?,
        );
        Some(Self {
            segment: segment as u16,
            source: (bus << 8 | device << 3 | function) as u16,
        })
    }

    pub const fn bus(self) -> u8 {
        (self.source >> 8) as u8
    }
    pub const fn device(self) -> u8 {
        ((self.source >> 3) & 31) as u8
    }
    pub const fn function(self) -> u8 {
        (self.source & 7) as u8
    }
}

/// Frames shared between the services that name them (bulk data).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Shared<'a> {
    pub name: &'a str,
    pub pages: u32,
}

/// One guest domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Domain<'a> {
    pub name: &'a str,
    /// The boot module holding the guest's multiboot ELF image.
    pub guest: &'a str,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    pub vcpus: u8,
    /// The command line the guest finds in its multiboot information (after
    /// the image's name).
    pub cmdline: &'a str,
    /// The endpoint that receives its vCPUs' exits.
    pub exits: &'a str,
    /// The endpoint that receives its EPT violations.
    pub violations: &'a str,
    /// Who may introspect it, and how (ALT-3's XSM-like checks; issue 13,
    /// point 3): the services named (the host is the `console`), each with
    /// [`introspection`] rights. Nobody else.
    pub introspection: Vec<Introspector<'a>, MAX_SERVICES>,
    /// Not started or unpaused while services hold foreign mappings of
    /// its memory (FM-2; docs/introspection.md, Foreign mappings).
    pub protected: bool,
    /// Multiboot modules for its kernel, in order (docs/guests.md).
    pub modules: Vec<GuestModule<'a>, MAX_GUEST_MODULES>,
    /// PCI functions assigned to it: their DMA reaches its RAM at bus
    /// address = guest-physical address, and nothing else (docs/iommu.md).
    pub devices: Vec<DomainDevice, MAX_DOMAIN_DEVICES>,
    /// `rmrr = "host"`: the host's reserved regions are checked against
    /// its RAM as for a device's (RMRR-2), so a device with RMRRs can be
    /// given to it later.
    pub rmrr_host: bool,
    /// The policy for `rmrr_host` (the manifest's `rmrr_policy`).
    pub rmrr_relaxed: bool,
}

/// A device assigned to a domain, with its RMRR conflict policy (RMRR-5):
/// strict (a reserved region that meets the domain's RAM fails the build,
/// naming it) or relaxed (a warning; that region is not identity-mapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DomainDevice {
    pub device: PciDevice,
    pub rmrr_relaxed: bool,
}

/// The most PCI functions one domain is assigned.
pub const MAX_DOMAIN_DEVICES: usize = 8;

/// One multiboot module of a guest kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct GuestModule<'a> {
    /// The boot module holding its bytes.
    pub module: &'a str,
    /// The string the kernel finds for it (the file's name, then the
    /// manifest's command line), as `qemu -initrd` gives it.
    pub cmdline: &'a str,
}

/// A service that may introspect a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Introspector<'a> {
    pub service: &'a str,
    /// [`introspection`] bits.
    pub rights: u8,
}

/// What an introspector may do with a domain.
pub mod introspection {
    /// Read its memory and registers (the introspect service).
    pub const READ: u8 = 1 << 0;
    /// Write its memory, set its registers (the introspect service).
    pub const WRITE: u8 = 1 << 1;
    /// Create, change and query its views, set its altp2m mode (the altp2m
    /// service, as an external agent).
    pub const VIEWS: u8 = 1 << 2;
    /// Listen to its violation events and answer them, set its no-listener
    /// policy (the altp2m service).
    pub const EVENTS: u8 = 1 << 3;
    pub const ALL: u8 = READ | WRITE | VIEWS | EVENTS;
    /// Names, for manifests and logs.
    pub const NAMES: [(&str, u8); 4] = [
        ("read", READ),
        ("write", WRITE),
        ("views", VIEWS),
        ("events", EVENTS),
    ];

    /// The name of one right.
    pub fn name(bit: u8) -> &'static str {
        NAMES
            .iter()
            .find(|(_, b)| *b == bit)
            .map_or("?", |(n, _)| n)
    }
}

/// The key of this manifest format.
pub const MANIFEST_KEY: Key = Key::for_path::<Manifest<'static>>("parallax/manifest");

/// Why a manifest module was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ManifestError {
    /// The module does not start with "PLXM": it is not a compiled manifest.
    NotAManifest,
    /// It was compiled against another version of this schema.
    WrongKey { found: [u8; 8], expected: [u8; 8] },
    /// The body does not decode (truncated, corrupted, or bytes left over).
    Corrupt,
}

impl<'a> Manifest<'a> {
    /// Reads a compiled manifest.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, ManifestError> {
        let rest = bytes
            .strip_prefix(&MAGIC)
            .ok_or(ManifestError::NotAManifest)?;
        if rest.len() < 8 {
            return Err(ManifestError::Corrupt);
        }
        let (key, body) = rest.split_at(8);
        let found: [u8; 8] = key.try_into().map_err(|_| ManifestError::Corrupt)?;
        if found != MANIFEST_KEY.to_bytes() {
            return Err(ManifestError::WrongKey {
                found,
                expected: MANIFEST_KEY.to_bytes(),
            });
        }
        match postcard::take_from_bytes::<Manifest<'a>>(body) {
            Ok((m, [])) => Ok(m),
            _ => Err(ManifestError::Corrupt),
        }
    }

    /// Writes the compiled form into `out`, returning the bytes used.
    pub fn encode<'o>(&self, out: &'o mut [u8]) -> Result<&'o [u8], postcard::Error> {
        if out.len() < 12 {
            return Err(postcard::Error::SerializeBufferFull);
        }
        out[..4].copy_from_slice(&MAGIC);
        out[4..12].copy_from_slice(&MANIFEST_KEY.to_bytes());
        let n = postcard::to_slice(self, &mut out[12..])?.len();
        Ok(&out[..12 + n])
    }

    /// The names of every boot module this manifest needs, each once:
    /// service images, then guest images.
    pub fn modules(&self) -> impl Iterator<Item = &'a str> + '_ {
        let all = self
            .services
            .iter()
            .map(|s| s.module)
            .chain(self.domains.iter().map(|d| d.guest));
        all.clone()
            .enumerate()
            .filter(move |(i, m)| !all.clone().take(*i).any(|n| n == *m))
            .map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest<'static> {
        let mut domains = Vec::new();
        for (name, guest) in [("a", "hello"), ("b", "cpuid"), ("c", "hello")] {
            domains
                .push(Domain {
                    name,
                    guest,
                    memory_mib: 16,
                    vcpus: 1,
                    cmdline: "quiet",
                    exits: "vmexits",
                    violations: "violations",
                    introspection: Vec::from_slice(&[Introspector {
                        service: "console",
                        rights: introspection::ALL,
                    }])
                    .unwrap(),
                    protected: name == "b",
                    modules: Vec::new(),
                    devices: if name == "a" {
                        Vec::from_slice(&[DomainDevice {
                            device: PciDevice::parse("00:03.0").unwrap(),
                            rmrr_relaxed: true,
                        }])
                        .unwrap()
                    } else {
                        Vec::new()
                    },
                    rmrr_host: name == "c",
                    rmrr_relaxed: false,
                })
                .unwrap();
        }
        let mut handles = Vec::new();
        handles
            .push(HandleSpec {
                name: "exits",
                object: Object::Endpoint("vmexits"),
                rights: 2,
            })
            .unwrap();
        handles
            .push(HandleSpec {
                name: "com2",
                object: Object::IoPorts {
                    base: 0x2f8,
                    count: 8,
                },
                rights: 1024,
            })
            .unwrap();
        let mut services = Vec::new();
        services
            .push(Service {
                name: "vmm",
                module: "vmm",
                disposition: Disposition::Restart,
                max_restarts: 3,
                restart_window_ms: 1000,
                task: false,
                handles,
                dma_clients: 1,
            })
            .unwrap();
        let mut shared = Vec::new();
        shared
            .push(Shared {
                name: "swap",
                pages: 256,
            })
            .unwrap();
        Manifest {
            name: "test",
            services,
            shared,
            domains,
        }
    }

    #[test]
    fn pci_addresses_parse_with_and_without_a_segment() {
        let d = PciDevice::parse("00:03.0").unwrap();
        assert_eq!((d.segment, d.source), (0, 3 << 3));
        let d = PciDevice::parse("0001:1a:1f.7").unwrap();
        assert_eq!(
            (d.segment, d.bus(), d.device(), d.function()),
            (1, 0x1a, 0x1f, 7)
        );
        for bad in [
            "",
            "00:03",
            "0:0:0:0.0",
            "00:20.0",
            "00:03.8",
            "100:03.0",
            "zz:03.0",
            "00:03.",
            "10000:00:00.0",
        ] {
            assert_eq!(PciDevice::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn roundtrips_and_lists_each_module_once() {
        let mut buf = [0u8; 1024];
        let bytes = sample().encode(&mut buf).unwrap().to_vec();
        let m = Manifest::decode(&bytes).unwrap();
        assert_eq!(m, sample());
        assert_eq!(
            m.modules().collect::<std::vec::Vec<_>>(),
            ["vmm", "hello", "cpuid"]
        );
    }

    #[test]
    fn refuses_what_is_not_a_manifest() {
        assert_eq!(
            Manifest::decode(b"\x7fELF...."),
            Err(ManifestError::NotAManifest)
        );
        assert_eq!(Manifest::decode(b""), Err(ManifestError::NotAManifest));
        assert_eq!(Manifest::decode(b"PLXM1234"), Err(ManifestError::Corrupt));
    }

    #[test]
    fn refuses_another_schema_naming_both_keys() {
        let mut buf = [0u8; 1024];
        let mut bytes = sample().encode(&mut buf).unwrap().to_vec();
        bytes[4] ^= 0xff;
        let mut found = MANIFEST_KEY.to_bytes();
        found[0] ^= 0xff;
        assert_eq!(
            Manifest::decode(&bytes),
            Err(ManifestError::WrongKey {
                found,
                expected: MANIFEST_KEY.to_bytes()
            })
        );
    }

    #[test]
    fn refuses_truncation_and_trailing_bytes() {
        let mut buf = [0u8; 1024];
        let bytes = sample().encode(&mut buf).unwrap().to_vec();
        for cut in 12..bytes.len() {
            assert_eq!(
                Manifest::decode(&bytes[..cut]),
                Err(ManifestError::Corrupt),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Manifest::decode(&longer), Err(ManifestError::Corrupt));
    }

    proptest! {
        #[test]
        fn corrupted_bodies_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut buf = [0u8; 1024];
            let mut bytes = sample().encode(&mut buf).unwrap().to_vec();
            for (at, v) in flips {
                let i = 12 + at % (bytes.len() - 12);
                bytes[i] = v;
            }
            let _ = Manifest::decode(&bytes);
        }
    }
}
