//! What the program's end-to-end tests share: running the built binary and checking how it
//! ended. Each test file takes what it uses (`mod common;`), so some go unused in each.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The built `maskattn` with `args`, to its end.
pub fn maskattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(args)
        .output()
        .unwrap()
}

/// Standard output of a command that must succeed (its standard error in the failure).
pub fn ok(args: &[&str]) -> String {
    let o = maskattn(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "maskattn {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard output then standard error of a command that must succeed.
pub fn ok_all(args: &[&str]) -> String {
    let o = maskattn(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "maskattn {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

/// Standard error of a command that must fail.
pub fn fails(args: &[&str]) -> String {
    let o = maskattn(args);
    assert!(!o.status.success(), "maskattn {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}
