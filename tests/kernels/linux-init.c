/*
 * /init of the initramfs the Linux boot test and `cargo hv bench` build
 * (image-builder/src/linux.rs): a static program with no C library
 * (gcc -static -nostdlib -ffreestanding), for Linux on x86-64.
 *
 * It prints its first line with the TSC at its start, then, when the
 * kernel's command line gave it `pxidle=S` (an argument with '=' the kernel
 * does not know reaches init's environment; `idle=` is the kernel's own), sleeps S seconds of the guest's CLOCK_MONOTONIC and
 * prints the VM exits its vCPU caused meanwhile (Parallax's HC_EXIT_COUNT
 * hypercall, which guest user mode may make) and the time slept, and
 * powers the machine off with reboot(2) (LINUX_REBOOT_CMD_POWER_OFF: the
 * kernel goes through ACPI's S5).
 */

typedef unsigned long u64;

#define SYS_write 1
#define SYS_open 2
#define SYS_nanosleep 35
#define SYS_reboot 169
#define SYS_clock_gettime 228

struct timespec {
	long sec;
	long nsec;
};

static long syscall4(long n, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static u64 rdtsc(void)
{
	unsigned int lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* Parallax's HC_EXIT_COUNT (RAX = 1): RBX = the exits this vCPU caused. */
static u64 exits(void)
{
	u64 rax = 1, rbx;
	__asm__ volatile("vmcall" : "+a"(rax), "=b"(rbx) : : "memory");
	return rbx;
}

static u64 now_ns(void)
{
	struct timespec t;
	syscall4(SYS_clock_gettime, 1 /* CLOCK_MONOTONIC */, (long)&t, 0, 0);
	return (u64)t.sec * 1000000000ul + (u64)t.nsec;
}

static char line[160];
static int len;

static void put(const char *s)
{
	while (*s && len < (int)sizeof(line))
		line[len++] = *s++;
}

static void put_u64(u64 v)
{
	char d[21];
	int i = 0;
	do {
		d[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i && len < (int)sizeof(line))
		line[len++] = d[--i];
}

static void send(int fd)
{
	syscall4(SYS_write, fd, (long)line, len, 0);
	len = 0;
}

static u64 idle_seconds(char **envp)
{
	for (; *envp; envp++) {
		const char *e = *envp;
		const char *key = "pxidle=";
		int i = 0;
		while (key[i] && e[i] == key[i])
			i++;
		if (!key[i]) {
			u64 v = 0;
			for (e += i; *e >= '0' && *e <= '9'; e++)
				v = v * 10 + (u64)(*e - '0');
			return v;
		}
	}
	return 0;
}

__attribute__((used)) static void start(long *sp)
{
	u64 tsc = rdtsc();
	long argc = sp[0];
	char **envp = (char **)(sp + argc + 2);
	int fd = (int)syscall4(SYS_open, (long)"/dev/console", 1 /* O_WRONLY */, 0, 0);
	if (fd < 0)
		fd = 1;
	put("parallax-init: /init runs, tsc ");
	put_u64(tsc);
	put("\n");
	send(fd);
	u64 idle = idle_seconds(envp);
	if (idle) {
		struct timespec t = { (long)idle, 0 };
		u64 t0 = now_ns(), e0 = exits();
		syscall4(SYS_nanosleep, (long)&t, 0, 0, 0);
		u64 e1 = exits(), t1 = now_ns();
		put("parallax-init: idle ");
		put_u64(t1 - t0);
		put(" ns, ");
		put_u64(e1 - e0);
		put(" exits\n");
		send(fd);
	}
	put("parallax-init: powering off\n");
	send(fd);
	syscall4(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc /* POWER_OFF */, 0);
	for (;;)
		__asm__ volatile("pause");
}

/* The kernel enters with RSP at argc, argv..., 0, envp..., 0. */
__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start\n"
	"	ud2\n");
