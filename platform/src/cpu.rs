//! CPUID and MSRs: reading them (two instructions) and decoding what Parallax
//! needs to know about the processor (a pure function of the raw leaves).

/// The four registers a CPUID leaf returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID for `leaf` and `subleaf` on this processor.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // CPUID is unprivileged, has no side effects, and every x86-64 CPU has it.
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Reads a model-specific register.
///
/// # Safety
/// Reading an MSR the processor does not implement raises #GP; the caller must
/// have checked (through CPUID or documented architecture) that `msr` exists.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // Safety: forwarded to the caller.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// MSR writes change processor behaviour globally; the caller must know the
/// register exists and that the value is valid and intended.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // Safety: forwarded to the caller.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32,
            in("edx") (value >> 32) as u32, options(nostack, preserves_flags));
    }
}

/// Reads the time-stamp counter. On Bochs with `clock: sync=none` it advances
/// about once per emulated instruction (facts/emulators.md).
#[inline]
pub fn rdtsc() -> u64 {
    // Safety: RDTSC is allowed in ring 0 (and in ring 3, CR4.TSD being
    // clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// What Parallax needs to know about the processor, decoded from CPUID.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CpuInfo {
    /// "GenuineIntel", "AuthenticAMD", ...
    pub vendor: [u8; 12],
    /// The processor brand string, NUL-padded; empty where not reported.
    pub brand: [u8; 48],
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// Initial APIC id of the processor that ran CPUID.
    pub apic_id: u8,
    /// Processor supports VMX (CPUID.1:ECX[5]).
    pub vmx: bool,
    /// Processor supports x2APIC mode (CPUID.1:ECX[21]).
    pub x2apic: bool,
    /// The local APIC timer supports TSC-deadline mode (CPUID.1:ECX[24]).
    pub tsc_deadline: bool,
    /// Running under a hypervisor (CPUID.1:ECX[31]).
    pub hypervisor: bool,
    /// 1 GiB pages (CPUID.80000001h:EDX[26]).
    pub page_1g: bool,
    /// Execute-disable bit (CPUID.80000001h:EDX[20]).
    pub nx: bool,
    /// The TSC runs at a constant rate in every state (CPUID.80000007h:EDX[8]).
    pub invariant_tsc: bool,
    /// Physical address width in bits (CPUID.80000008h:EAX[7:0]; 36 if absent).
    pub phys_addr_bits: u8,
}

impl CpuInfo {
    /// Decodes the processor description from a CPUID function. Leaves the
    /// processor does not report are treated as all zero.
    pub fn decode(cpuid: impl Fn(u32, u32) -> CpuidResult) -> Self {
        let leaf0 = cpuid(0, 0);
        let max_basic = leaf0.eax;
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());

        let leaf1 = if max_basic >= 1 {
            cpuid(1, 0)
        } else {
            CpuidResult::default()
        };
        let base_family = (leaf1.eax >> 8) & 0xf;
        let base_model = (leaf1.eax >> 4) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((leaf1.eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            base_model | (((leaf1.eax >> 16) & 0xf) << 4)
        } else {
            base_model
        };

        let max_ext = cpuid(0x8000_0000, 0).eax;
        let ext = |leaf: u32| {
            if max_ext >= leaf {
                cpuid(leaf, 0)
            } else {
                CpuidResult::default()
            }
        };
        let ext1 = ext(0x8000_0001);
        let mut brand = [0u8; 48];
        if max_ext >= 0x8000_0004 {
            for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
                let r = cpuid(leaf, 0);
                for (j, reg) in [r.eax, r.ebx, r.ecx, r.edx].into_iter().enumerate() {
                    let at = i * 16 + j * 4;
                    brand[at..at + 4].copy_from_slice(&reg.to_le_bytes());
                }
            }
        }
        let phys_bits = (ext(0x8000_0008).eax & 0xff) as u8;

        Self {
            vendor,
            brand,
            family,
            model,
            stepping: leaf1.eax & 0xf,
            apic_id: (leaf1.ebx >> 24) as u8,
            vmx: leaf1.ecx & (1 << 5) != 0,
            x2apic: leaf1.ecx & (1 << 21) != 0,
            tsc_deadline: leaf1.ecx & (1 << 24) != 0,
            hypervisor: leaf1.ecx & (1 << 31) != 0,
            page_1g: ext1.edx & (1 << 26) != 0,
            nx: ext1.edx & (1 << 20) != 0,
            invariant_tsc: ext(0x8000_0007).edx & (1 << 8) != 0,
            phys_addr_bits: if phys_bits == 0 { 36 } else { phys_bits },
        }
    }

    /// Reads and decodes this processor's description.
    pub fn read() -> Self {
        Self::decode(cpuid)
    }

    /// The vendor string, as text.
    pub fn vendor_str(&self) -> &str {
        text(&self.vendor)
    }

    /// The brand string without padding, as text.
    pub fn brand_str(&self) -> &str {
        text(&self.brand).trim()
    }
}

/// The printable prefix of a NUL-padded ASCII field.
fn text(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPUID leaves as Bochs 2.7 reports them for `corei7_skylake_x` (the
    /// leaves this decoder reads), captured with `--log debug`.
    fn skylake(leaf: u32, _sub: u32) -> CpuidResult {
        let r = |eax, ebx, ecx, edx| CpuidResult { eax, ebx, ecx, edx };
        match leaf {
            0 => r(0x16, 0x756e6547, 0x6c65746e, 0x49656e69),
            1 => r(0x50654, 0x10800, 0x77faf3bf, 0xbfebfbff),
            0x8000_0000 => r(0x80000008, 0, 0, 0),
            0x8000_0001 => r(0, 0, 0x121, 0x2c100800),
            0x8000_0002 => r(0x65746e49, 0x2952286c, 0x726f4320, 0x4d542865),
            0x8000_0003 => r(0x37692029, 0x3038372d, 0x43205830, 0x40205550),
            0x8000_0004 => r(0x352e3320, 0x7a484730, 0, 0),
            0x8000_0007 => r(0, 0, 0, 0x100),
            0x8000_0008 => r(0x3028, 0, 0, 0),
            _ => r(0, 0, 0, 0),
        }
    }

    /// QEMU 7.2 TCG with `-cpu max`: an AMD-flavoured CPU without VMX.
    fn qemu_tcg_max(leaf: u32, _sub: u32) -> CpuidResult {
        let r = |eax, ebx, ecx, edx| CpuidResult { eax, ebx, ecx, edx };
        match leaf {
            0 => r(0xd, 0x68747541, 0x444d4163, 0x69746e65),
            1 => r(0x60fb1, 0x800, 0xf6d8320b, 0xfcbfbfd),
            0x8000_0000 => r(0x8000000a, 0x68747541, 0x444d4163, 0x69746e65),
            0x8000_0001 => r(0x60fb1, 0, 0x75, 0xedd3fbfd),
            0x8000_0002 => r(0x554d4551, 0x47435420, 0x55504320, 0x72657620),
            0x8000_0003 => r(0x6e6f6973, 0x352e3220, 0x2b, 0),
            0x8000_0008 => r(0x3928, 0, 0, 0),
            _ => r(0, 0, 0, 0),
        }
    }

    #[test]
    fn decodes_qemu_tcg_without_vmx() {
        let info = CpuInfo::decode(qemu_tcg_max);
        assert_eq!(info.vendor_str(), "AuthenticAMD");
        assert_eq!(info.brand_str(), "QEMU TCG CPU version 2.5+");
        assert!(!info.vmx && !info.x2apic && info.hypervisor && info.page_1g);
        assert_eq!(info.phys_addr_bits, 40);
    }

    #[test]
    fn decodes_an_intel_skylake() {
        let info = CpuInfo::decode(skylake);
        assert_eq!(info.vendor_str(), "GenuineIntel");
        assert_eq!(info.brand_str(), "Intel(R) Core(TM) i7-7800X CPU @ 3.50GHz");
        assert_eq!((info.family, info.model, info.stepping), (6, 0x55, 4));
        assert!(info.vmx && info.x2apic && info.tsc_deadline && !info.hypervisor);
        assert!(info.page_1g && info.nx && info.invariant_tsc);
        assert_eq!(info.phys_addr_bits, 40);
    }

    #[test]
    fn missing_leaves_read_as_absent_features() {
        let info = CpuInfo::decode(|leaf, _| match leaf {
            0 => CpuidResult {
                eax: 1,
                ..Default::default()
            },
            1 => CpuidResult {
                eax: 0x0f41,
                ..Default::default()
            },
            _ => CpuidResult::default(),
        });
        assert!(!info.vmx && !info.page_1g && !info.x2apic);
        assert_eq!(info.family, 0xf);
        assert_eq!(info.phys_addr_bits, 36);
        assert_eq!(info.brand_str(), "");
    }
}
