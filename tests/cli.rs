//! The command line as a user's shell sees it.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    // `picie openapi | head -1`: the reader is gone before the document (84 kB) is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_picie")).arg("openapi").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "ended by the closed pipe, as `cat` would: {:?}", out.status);
}
