//! Keeping freed memory for the next allocation while training.
//!
//! glibc serves every allocation above its mmap threshold (32 MB at most) with fresh pages from
//! the kernel and returns them on free. A training step at 320x320, batch 8, allocates and frees
//! activations and gradients of 10-80 MB hundreds of times, so the kernel page-faulted and
//! zeroed each of them anew: in `cargo bench --bench train` about a fifth of the process's CPU
//! time was system time. Served from the heap and never trimmed, the same pages are reused.
//! The peak is unchanged (the same tensors are alive at once); the process keeps its peak until
//! it exits, which suits a process that trains and ends (`picie train`) or a dedicated job
//! worker (`picie serve --role worker`), not a server that should shrink back after a job.

/// Extra heap requested from the kernel each time the heap grows.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD_BYTES: i32 = 256 << 20;

/// Tells the allocator to serve large blocks from one heap and keep freed memory: glibc's
/// `MALLOC_ARENA_MAX=1`, `MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_` at its largest and
/// `MALLOC_TOP_PAD_=256 MB`. Call it before the process starts threads: a thread that already
/// allocated keeps its own arena, and glibc's per-thread arenas fall back to mmap for blocks
/// over 64 MB whatever the settings, so one arena is what makes the rest hold everywhere.
/// Returns whether it took effect: false on other C libraries, which have their own policies.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; glibc takes its own lock.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD_BYTES) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The same settings as environment variables, for a child process (the PyTorch side of the
/// training bench runs under the same allocator policy as burn's).
pub const KEEP_FREED_MEMORY_ENV: [(&str, &str); 4] =
    [("MALLOC_ARENA_MAX", "1"), ("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", "2147483647"), ("MALLOC_TOP_PAD_", "268435456")];

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn page_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        usage.ru_minflt
    }

    /// Allocates, touches and frees a 64 MB block (16,384 pages); the page faults it took.
    fn touch_block() -> i64 {
        let before = page_faults();
        let mut block = vec![0u8; 64 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&block);
        drop(block);
        page_faults() - before
    }

    const PROBE: &str = "PICIE_MEMORY_PROBE";

    /// Run in a child process by the test below: the test harness runs each test on a thread of
    /// its own, with its own arena, so the child starts with one arena from its environment as
    /// `picie train` has by calling `keep_freed_memory` first thing.
    #[test]
    fn probe() {
        let Ok(mode) = std::env::var(PROBE) else { return };
        if mode == "keep" {
            assert!(keep_freed_memory());
        }
        touch_block();
        println!("page faults on reuse: {}", touch_block());
    }

    fn faults_on_reuse(mode: &str) -> i64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["train::memory::tests::probe", "--exact", "--nocapture", "--test-threads=1"])
            .env(PROBE, mode)
            .env("MALLOC_ARENA_MAX", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "probe failed: {text}");
        text.lines()
            .find_map(|l| l.split("page faults on reuse: ").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no probe line in {text}"))
    }

    #[test]
    fn a_freed_large_block_is_reused_without_page_faults() {
        let kept = faults_on_reuse("keep");
        let default = faults_on_reuse("default");
        assert!(kept < 1_000, "{kept} page faults for a block freed just before");
        // The control: with glibc's defaults the block is a fresh mapping each time.
        assert!(default > 16_000, "{default} page faults with glibc's defaults");
    }
}
