//! A local APIC, one register model reached two ways: in x2APIC mode
//! through its MSRs (0x800-0x8ff) and IA32_TSC_DEADLINE (0x6e0), in xAPIC
//! mode (the mode at reset) through its page at 0xfee00000. The task
//! priority, end of interrupt, the spurious-vector register (software
//! enable), the in-service, request and trigger-mode registers, the error
//! status, self-IPIs (the SELF IPI register, and the ICR with the self
//! shorthand or the vCPU's own ID, fixed delivery), and the timer in
//! one-shot, periodic and TSC-deadline modes. The timer counts at the TSC's
//! rate divided by the divide configuration. A guest turns x2APIC mode on
//! through IA32_APIC_BASE (bits 10 and 11); before that the x2APIC MSRs
//! give #GP, as on hardware.
//!
//! The xAPIC page is the CPU's (VMX APIC virtualization, docs/vmx.md): it
//! reads most registers from the vCPU's virtual-APIC page without an exit,
//! and a write arrives here afterwards ([`Lapic::write_mmio`]). What the
//! guest reads there is [`Lapic::image`], which the vmm copies into that
//! page when it changes.

/// The vCPU's APIC ID.
pub const ID: u32 = 0;
const VERSION: u32 = 0x0005_0014; // 6 LVT entries, version 0x14

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lapic {
    /// IA32_APIC_BASE: enabled (bit 11), x2APIC (bit 10), BSP (bit 8).
    pub base: u64,
    tpr: u8,
    svr: u32,
    isr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    icr: u64,
    /// xAPIC mode's logical destination and destination format registers.
    ldr: u32,
    dfr: u32,
    /// LVT timer, thermal, PMC, LINT0, LINT1, error (masked at reset).
    lvt: [u32; 6],
    divide: u32,
    initial: u32,
    /// The TSC at which the current count started.
    start: u64,
    /// The TSC of the timer's next expiry (`u64::MAX`: none).
    pub expiry: u64,
    /// The vector the last EOI ended, for the I/O APIC's level entries
    /// (taken by the caller).
    pub eoied: Option<u8>,
}

impl Default for Lapic {
    fn default() -> Self {
        Lapic {
            base: 0xfee0_0900,
            tpr: 0,
            svr: 0xff,
            isr: [0; 8],
            irr: [0; 8],
            esr: 0,
            icr: 0,
            ldr: 0,
            dfr: u32::MAX,
            lvt: [1 << 16; 6],
            divide: 0,
            initial: 0,
            start: 0,
            expiry: u64::MAX,
            eoied: None,
        }
    }
}

/// How many registers [`Lapic::image`] gives.
pub const IMAGE_LEN: usize = 41;

const fn image_offsets() -> [u16; IMAGE_LEN] {
    let mut out = [0u16; IMAGE_LEN];
    let singles = [
        0x20, 0x30, 0xb0, 0xd0, 0xe0, 0xf0, 0x280, 0x300, 0x310, 0x380, 0x3e0,
    ];
    let mut n = 0;
    while n < singles.len() {
        out[n] = singles[n];
        n += 1;
    }
    // ISR, TMR and IRR (8 each, 0x100-0x270), then the six LVTs.
    let mut i = 0;
    while i < 24 + 6 {
        out[n] = if i < 24 {
            0x100 + 0x10 * i
        } else {
            0x320 + 0x10 * (i - 24)
        };
        n += 1;
        i += 1;
    }
    out
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i * 32 + 31 - bits[i].leading_zeros() as usize) as u8)
}

fn set(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v / 32)] |= 1 << (v % 32);
}

fn clear(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v / 32)] &= !(1 << (v % 32));
}

impl Lapic {
    /// x2APIC mode is on (and the APIC enabled).
    pub fn x2apic(&self) -> bool {
        self.base & (3 << 10) == 3 << 10
    }

    fn software_enabled(&self) -> bool {
        self.svr & (1 << 8) != 0
    }

    /// A write of IA32_APIC_BASE; false for one the hardware refuses (#GP):
    /// reserved bits, another base, x2APIC without enable, or leaving
    /// x2APIC mode for xAPIC.
    pub fn write_base(&mut self, v: u64) -> bool {
        let keep = 0xfee0_0000 | (1 << 8);
        if v & !(keep | (3 << 10)) != 0 || v & 0xffff_f000 != 0xfee0_0000 {
            return false;
        }
        let (enable, x2) = (v & (1 << 11) != 0, v & (1 << 10) != 0);
        if x2 && !enable || (self.x2apic() && enable && !x2) {
            return false;
        }
        if !enable {
            *self = Lapic {
                base: v,
                ..Lapic::default()
            };
            return true;
        }
        self.base = v;
        true
    }

    /// The timer's ticks per TSC tick: its divide configuration.
    fn divisor(&self) -> u64 {
        let code = (self.divide & 3) | ((self.divide >> 1) & 4);
        if code == 7 { 1 } else { 2 << code }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[0] >> 17) & 3
    }

    /// Whether `msr` is one of the x2APIC's.
    pub fn owns(msr: u32) -> bool {
        (0x800..=0x8ff).contains(&msr) || msr == 0x6e0
    }

    /// RDMSR of `msr`; `None`: #GP.
    pub fn read(&self, msr: u32, now: u64) -> Option<u64> {
        if msr == 0x6e0 {
            return Some(if self.timer_mode() == 2 && self.expiry != u64::MAX {
                self.expiry
            } else {
                0
            });
        }
        if !self.x2apic() {
            return None;
        }
        let offset = ((msr - 0x800) << 4) as u16;
        Some(u64::from(match offset {
            0x020 => ID,
            0x0d0 => 1 << ID, // logical ID: cluster 0, bit of the ID
            0x0b0 | 0x0e0 | 0x310 => return None,
            0x300 => return Some(self.icr),
            _ => self.register(offset, now)?,
        }))
    }

    /// The register at `offset` in the APIC's page, as both modes read it
    /// (the mode's own registers apart); `None`: no such register.
    fn register(&self, offset: u16, now: u64) -> Option<u32> {
        let index = |base: u16| usize::from((offset - base) >> 4);
        Some(match offset {
            0x020 => ID << 24,
            0x030 => VERSION,
            0x080 => u32::from(self.tpr),
            0x0a0 => u32::from(self.tpr.max(highest(&self.isr).unwrap_or(0) & 0xf0)),
            0x0b0 => 0,
            0x0d0 => self.ldr,
            0x0e0 => self.dfr,
            0x0f0 => self.svr,
            0x100..=0x170 => self.isr[index(0x100)],
            0x180..=0x1f0 => 0,
            0x200..=0x270 => self.irr[index(0x200)],
            0x280 => self.esr,
            0x300 => self.icr as u32,
            0x310 => (self.icr >> 32) as u32,
            0x320..=0x370 => self.lvt[index(0x320)],
            0x380 => self.initial,
            0x390 => self.current(now),
            0x3e0 => self.divide,
            _ => return None,
        })
    }

    /// The registers the CPU reads from the xAPIC page without an exit
    /// (APIC-register virtualization), at these offsets.
    pub const IMAGE: [u16; IMAGE_LEN] = image_offsets();

    /// Their values now, in [`Lapic::IMAGE`]'s order (what the vCPU's
    /// virtual-APIC page must hold; the task priority there is the
    /// guest's own and not among them).
    pub fn image(&self) -> [u32; IMAGE_LEN] {
        let mut out = [0; IMAGE_LEN];
        for (v, &offset) in out.iter_mut().zip(Self::IMAGE.iter()) {
            *v = self.register(offset, 0).unwrap_or(0);
        }
        out
    }

    /// A write the guest made to the xAPIC page at `offset` (`value`: the
    /// 32 bits written; for the ICR's low half, the high half above
    /// them, as the CPU holds it); false: not a register it may write
    /// (outside xAPIC mode: none), and nothing changes.
    pub fn write_mmio(&mut self, offset: u16, value: u64, now: u64) -> bool {
        if !self.xapic() {
            return false;
        }
        let v32 = value as u32;
        match offset {
            0x020 => {} // the ID stays
            0x0b0 => self.eoi(),
            0x0d0 => self.ldr = v32 & 0xff00_0000,
            0x0e0 => self.dfr = v32 | 0x0fff_ffff,
            0x300 => {
                // The destination is the high half's top byte.
                let dest = (value >> 56) as u32;
                self.icr = (value & 0xff00_0000_0000_0000) | u64::from(v32 & !(1 << 12));
                self.send_ipi(v32, dest);
            }
            0x310 => self.icr = (self.icr & 0xffff_ffff) | (u64::from(v32 & 0xff00_0000) << 32),
            _ => return self.write_register(offset, v32, now),
        }
        true
    }

    /// xAPIC mode is on: the APIC enabled, not in x2APIC mode.
    pub fn xapic(&self) -> bool {
        self.base & (3 << 10) == 1 << 11
    }

    fn eoi(&mut self) {
        if let Some(s) = highest(&self.isr) {
            clear(&mut self.isr, s);
            self.eoied = Some(s);
        }
    }

    /// An ICR write: a fixed interrupt to itself is delivered, anything
    /// else dropped (there is no other CPU).
    fn send_ipi(&mut self, low: u32, dest: u32) {
        let (vector, mode, shorthand) = (low as u8, (low >> 8) & 7, (low >> 18) & 3);
        let to_self = shorthand == 1 || (shorthand == 0 && dest == ID);
        if mode == 0 && to_self {
            self.accept(vector);
        }
    }

    fn current(&self, now: u64) -> u32 {
        if self.initial == 0 || self.timer_mode() == 2 {
            return 0;
        }
        let ticks = now.saturating_sub(self.start) / self.divisor();
        let n = u64::from(self.initial);
        match self.timer_mode() {
            1 => (n - ticks % n) as u32,
            _ => n.saturating_sub(ticks) as u32,
        }
    }

    fn arm(&mut self, now: u64) {
        self.start = now;
        self.expiry = if self.initial == 0 {
            u64::MAX
        } else {
            now.saturating_add(u64::from(self.initial) * self.divisor())
        };
    }

    /// WRMSR of `msr`; false: #GP.
    pub fn write(&mut self, msr: u32, v: u64, now: u64) -> bool {
        if msr == 0x6e0 {
            if self.timer_mode() == 2 {
                self.expiry = if v == 0 { u64::MAX } else { v };
            }
            return true;
        }
        if !self.x2apic() {
            return false;
        }
        match msr {
            0x80b => {
                if v != 0 {
                    return false;
                }
                self.eoi();
            }
            0x830 => {
                self.icr = v & !(1 << 12);
                self.send_ipi(v as u32, (v >> 32) as u32);
            }
            0x83f => self.accept(v as u8),
            0x800..=0x8ff => {
                return self.write_register(((msr - 0x800) << 4) as u16, v as u32, now);
            }
            _ => return false,
        }
        true
    }

    /// A write of the register at `offset` that both modes make alike;
    /// false: not one the guest may write.
    fn write_register(&mut self, offset: u16, v32: u32, now: u64) -> bool {
        match offset {
            0x080 => self.tpr = v32 as u8,
            0x0f0 => self.svr = v32 & 0x1ff,
            0x280 => self.esr = 0,
            0x320..=0x370 => {
                let i = usize::from((offset - 0x320) >> 4);
                let was = self.timer_mode();
                self.lvt[i] = v32 & 0x7_17ff;
                if !self.software_enabled() {
                    self.lvt[i] |= 1 << 16;
                }
                if i == 0 && self.timer_mode() != was {
                    self.initial = 0;
                    self.expiry = u64::MAX;
                }
            }
            0x380 => {
                if self.timer_mode() != 2 {
                    self.initial = v32;
                    self.arm(now);
                }
            }
            0x3e0 => self.divide = v32 & 0xb,
            _ => return false,
        }
        true
    }

    /// An interrupt from the I/O APIC.
    pub fn deliver(&mut self, vector: u8) {
        self.accept(vector);
    }

    /// Whether `vector` is requested (in the IRR).
    pub fn requested(&self, vector: u8) -> bool {
        self.irr[usize::from(vector / 32)] & (1 << (vector % 32)) != 0
    }

    /// A fixed interrupt for `vector` arrives (vectors below 16 are
    /// illegal: an error, as on hardware).
    fn accept(&mut self, vector: u8) {
        if vector < 16 {
            self.esr |= 1 << 6; // received illegal vector
            return;
        }
        if self.software_enabled() {
            set(&mut self.irr, vector);
        }
    }

    /// Whether the timer expired by `now`: its vector requested (once per
    /// call) and, periodic, the next expiry set.
    pub fn tick(&mut self, now: u64) {
        if now < self.expiry {
            return;
        }
        let period = u64::from(self.initial) * self.divisor();
        self.expiry = if self.timer_mode() == 1 && period != 0 {
            let behind = (now - self.expiry) / period + 1;
            self.expiry.saturating_add(behind.saturating_mul(period))
        } else {
            u64::MAX
        };
        let lvt = self.lvt[0];
        if lvt & (1 << 16) == 0 {
            self.accept(lvt as u8);
        }
    }

    /// The vector it would deliver now: the highest requested, above the
    /// priority of the highest in service and the task priority.
    pub fn pending(&self) -> Option<u8> {
        let v = highest(&self.irr)?;
        let busy = highest(&self.isr).map_or(0, |s| s & 0xf0);
        (v & 0xf0 > busy.max(self.tpr & 0xf0)).then_some(v)
    }

    /// The CPU takes it: from requested to in service.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending()?;
        clear(&mut self.irr, v);
        set(&mut self.isr, v);
        Some(v)
    }

    /// The timer's vector.
    pub fn timer_vector(&self) -> u8 {
        self.lvt[0] as u8
    }

    /// No timer expiry before `tsc` (periodic and one-shot alike).
    pub fn hold_off(&mut self, tsc: u64) {
        if self.expiry != u64::MAX && self.timer_mode() != 2 {
            self.expiry = self.expiry.max(tsc);
        }
    }

    /// The TSC of the timer's next expiry that matters: none while its
    /// vector is already requested.
    pub fn deadline(&self) -> u64 {
        let v = self.lvt[0] as u8;
        if self.irr[usize::from(v / 32)] & (1 << (v % 32)) != 0 {
            u64::MAX
        } else {
            self.expiry
        }
    }
}
