//! Reports what CPUID shows the guest, and fails if VMX is visible.
//!
//! Prints the vendor string, `vmx: yes/no` (CPUID.1:ECX[5]),
//! `hypervisor bit: yes/no` (CPUID.1:ECX[31]) and, when the hypervisor bit
//! is set, the signature (EBX, ECX, EDX of leaf 0x40000000, NULs trimmed)
//! and the highest hypervisor leaf (its EAX). Under Parallax the signature
//! is `ParallaxHV`.
//!
//! Exit status: 0 when VMX is hidden (a hypervisor must hide it from its
//! guests; plain QEMU's TCG has none either), 1 when it is visible.
#![no_std]
#![no_main]

use guest_runtime::{MultibootInfo, abi, cpuid, println};

guest_runtime::entry!(main);

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Registers as text, NULs trimmed (invalid UTF-8 shown as U+FFFD).
fn text(regs: &[u32]) -> reg_text::Text {
    let mut t = reg_text::Text::default();
    for r in regs {
        t.push_bytes(&r.to_le_bytes());
    }
    t
}

mod reg_text {
    /// Up to 16 bytes of register text.
    #[derive(Default)]
    pub struct Text {
        bytes: [u8; 16],
        len: usize,
    }

    impl Text {
        pub fn push_bytes(&mut self, bytes: &[u8]) {
            for &b in bytes {
                if self.len < self.bytes.len() {
                    self.bytes[self.len] = b;
                    self.len += 1;
                }
            }
        }
    }

    impl core::fmt::Display for Text {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let trimmed = self.bytes[..self.len]
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty());
            let mut first = true;
            for part in trimmed {
                if !first {
                    f.write_str(" ")?;
                }
                first = false;
                for chunk in part.utf8_chunks() {
                    f.write_str(chunk.valid())?;
                    if !chunk.invalid().is_empty() {
                        f.write_str("\u{fffd}")?;
                    }
                }
            }
            Ok(())
        }
    }
}

fn main(_info: &MultibootInfo) -> u32 {
    let leaf0 = cpuid(0, 0);
    println!("vendor: \"{}\"", text(&[leaf0.ebx, leaf0.edx, leaf0.ecx]));
    let leaf1 = cpuid(1, 0);
    let vmx = leaf1.ecx & (1 << 5) != 0;
    let hypervisor = leaf1.ecx & (1 << 31) != 0;
    println!("vmx: {}", yes_no(vmx));
    println!("hypervisor bit: {}", yes_no(hypervisor));
    if hypervisor {
        let hv = cpuid(0x4000_0000, 0);
        let raw: [u32; 3] = [hv.ebx, hv.ecx, hv.edx];
        let mut bytes = [0u8; 12];
        for (i, r) in raw.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
        }
        let parallax = if bytes == abi::CPUID_SIGNATURE {
            " (Parallax)"
        } else {
            ""
        };
        println!("hypervisor signature: \"{}\"{parallax}", text(&raw));
        println!("hypervisor max leaf: {:#x}", hv.eax);
    }
    if vmx {
        println!("FAIL: VMX is visible to the guest");
        1
    } else {
        println!("ok: VMX is hidden");
        0
    }
}
