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
/// The longest name of a domain, a service or a boot module.
pub const MAX_NAME: usize = 32;
/// The most vCPUs one domain has.
pub const MAX_VCPUS: u8 = 8;

/// The whole system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Manifest<'a> {
    /// The system's name, shown at boot.
    pub name: &'a str,
    pub domains: Vec<Domain<'a>, MAX_DOMAINS>,
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
    /// The command line the guest finds in its multiboot information.
    pub cmdline: &'a str,
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

    /// The names of every boot module this manifest needs, each once.
    pub fn modules(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.domains
            .iter()
            .enumerate()
            .filter(|(i, d)| !self.domains[..*i].iter().any(|e| e.guest == d.guest))
            .map(|(_, d)| d.guest)
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
                })
                .unwrap();
        }
        Manifest {
            name: "test",
            domains,
        }
    }

    #[test]
    fn roundtrips_and_lists_each_module_once() {
        let mut buf = [0u8; 512];
        let bytes = sample().encode(&mut buf).unwrap().to_vec();
        let m = Manifest::decode(&bytes).unwrap();
        assert_eq!(m, sample());
        assert_eq!(
            m.modules().collect::<std::vec::Vec<_>>(),
            ["hello", "cpuid"]
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
        let mut buf = [0u8; 512];
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
        let mut buf = [0u8; 512];
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
            let mut buf = [0u8; 512];
            let mut bytes = sample().encode(&mut buf).unwrap().to_vec();
            for (at, v) in flips {
                let i = 12 + at % (bytes.len() - 12);
                bytes[i] = v;
            }
            let _ = Manifest::decode(&bytes);
        }
    }
}
