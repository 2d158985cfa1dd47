//! A domain's dirty log: one bit per guest frame, set when the CPU's
//! page-modification log (PML) reports a write to it, read and cleared by
//! whoever tracks the domain's writes.
//!
//! The kernel's part is mechanical: drain each vCPU's 512-entry PML buffer
//! into the bitmap when it fills (a VM exit) and whenever the log is read,
//! so that no logged write is ever lost between buffer and bitmap.

use super::memory::{alloc_zeroed_frame, free_frame};
use super::vcpu::Vcpu;
use crate::mem::phys_to_virt;
use platform::PAGE_SIZE;
use platform::vmx::fields::GUEST_PML_INDEX;

/// Bits per bitmap frame.
const BITS_PER_FRAME: u64 = PAGE_SIZE * 8;
/// The most bitmap frames (covers 4 GiB of guest RAM).
const MAX_FRAMES: usize = 32;

pub struct DirtyLog {
    frames: heapless::Vec<u64, MAX_FRAMES>,
    gfns: u64,
    /// Logging is on.
    pub logging: bool,
    /// Set bits (for the `more` answer without a scan).
    pub count: u64,
}

impl DirtyLog {
    /// A log for a domain with `ram_bytes` of RAM (all clear, not logging).
    pub fn new(ram_bytes: u64) -> Option<Self> {
        let gfns = ram_bytes / PAGE_SIZE;
        let mut frames = heapless::Vec::new();
        for _ in 0..gfns.div_ceil(BITS_PER_FRAME) {
            match alloc_zeroed_frame() {
                Some(f) if frames.push(f).is_ok() => {}
                Some(f) => {
                    free_frame(f);
                    Self {
                        frames,
                        gfns,
                        logging: false,
                        count: 0,
                    }
                    .destroy();
                    return None;
                }
                None => {
                    Self {
                        frames,
                        gfns,
                        logging: false,
                        count: 0,
                    }
                    .destroy();
                    return None;
                }
            }
        }
        Some(Self {
            frames,
            gfns,
            logging: false,
            count: 0,
        })
    }

    fn word(&self, gfn: u64) -> *mut u64 {
        let frame = self.frames[(gfn / BITS_PER_FRAME) as usize];
        let word = (gfn % BITS_PER_FRAME) / 64;
        // The frame is ours, 512 words, in the direct map.
        phys_to_virt(frame)
            .cast::<u64>()
            .wrapping_add(word as usize)
    }

    /// Marks a frame dirty (gfns outside the domain's RAM are ignored: Bochs
    /// logs odd addresses now and then).
    pub fn mark(&mut self, gfn: u64) {
        if gfn >= self.gfns {
            return;
        }
        let w = self.word(gfn);
        let bit = 1u64 << (gfn % 64);
        // Safety: `w` points into a bitmap frame this log owns.
        unsafe {
            if w.read() & bit == 0 {
                w.write(w.read() | bit);
                self.count += 1;
            }
        }
    }

    /// Takes up to `max` dirty gfns, lowest first, clearing them; returns
    /// whether more remain.
    pub fn take(&mut self, max: usize, mut out: impl FnMut(u64)) -> bool {
        let mut taken = 0;
        let mut gfn = 0;
        while gfn < self.gfns && self.count > 0 {
            let w = self.word(gfn);
            // Safety: as in `mark`.
            let mut bits = unsafe { w.read() };
            if bits == 0 {
                gfn = (gfn / 64 + 1) * 64;
                continue;
            }
            while bits != 0 && taken < max {
                let b = bits.trailing_zeros() as u64;
                out(gfn / 64 * 64 + b);
                bits &= !(1 << b);
                taken += 1;
                self.count -= 1;
            }
            // Safety: as in `mark`.
            unsafe { w.write(bits) };
            if taken == max {
                break;
            }
            gfn = (gfn / 64 + 1) * 64;
        }
        self.count > 0
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        for &f in &self.frames {
            super::memory::zero(f, PAGE_SIZE);
        }
        self.count = 0;
    }

    pub fn destroy(self) {
        for f in self.frames {
            free_frame(f);
        }
    }
}

/// The PML index a fresh buffer starts at (entries fill downwards).
pub const PML_START: u64 = 511;

/// Moves the GPAs in `vcpu`'s PML buffer into `log` and resets the buffer.
/// The vCPU's VMCS must be current.
pub fn drain_pml(vcpu: &mut Vcpu, log: &mut DirtyLog) -> u32 {
    let Some(buffer) = vcpu.pml_buffer else {
        return 0;
    };
    let index = vcpu.read(GUEST_PML_INDEX) as u16;
    // The CPU decrements the index after each entry; past 0 it wraps to 0xffff.
    let first = if index > 511 {
        0
    } else {
        usize::from(index) + 1
    };
    let entries = phys_to_virt(buffer).cast::<u64>();
    for i in first..512 {
        // Safety: the buffer frame is this vCPU's, 512 entries, in the direct map.
        let gpa = unsafe { entries.add(i).read_volatile() };
        log.mark(gpa / PAGE_SIZE);
    }
    // Safety: the VMCS is current; 511 is the architectural start value.
    unsafe { vcpu.write(GUEST_PML_INDEX, PML_START) };
    (512 - first) as u32
}
