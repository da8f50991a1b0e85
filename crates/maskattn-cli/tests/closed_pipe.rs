//! `maskattn demo | head -1` and `maskattn bench | head -1`: when the reader closes the pipe
//! early, the program ends as `cat` does — killed by SIGPIPE (141 in a shell), with nothing
//! on stderr — never a Rust panic (exit 101).
#![cfg(unix)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

/// Runs the program, reads one line of its output, closes the pipe, and returns how the
/// program ended and what it wrote to stderr.
fn first_line_then_close(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // `out` dropped here: the read end of the pipe is closed.
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), line, err)
}

fn assert_quiet_sigpipe(args: &[&str]) {
    let (status, line, err) = first_line_then_close(args);
    assert!(!line.is_empty(), "{args:?}: no first line");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(err.is_empty(), "{args:?}: wrote to stderr: {err}");
    // The commands below keep printing after their first line, so they must meet the
    // closed pipe: killed by SIGPIPE, not a success that never wrote again, nor exit 101.
    assert_eq!(
        status.signal(),
        Some(libc::SIGPIPE),
        "{args:?}: ended with {status}"
    );
}

#[test]
fn demo_into_a_closed_pipe_ends_quietly() {
    assert_quiet_sigpipe(&["demo", "--shape", "1,2,2,128,32"]);
}

#[test]
fn bench_into_a_closed_pipe_ends_quietly() {
    assert_quiet_sigpipe(&["bench", "--shape", "1,2,128,32", "--reps", "1", "--suite"]);
}
