//! A hostile process for the end-to-end tests: it opens one path while a second thread
//! keeps rewriting the path in its memory to another, so that what the kernel opened and
//! what a probe reading the memory afterwards sees differ. Runs as `nobody`, so the other
//! path (readable by root only) can never be opened for real: anything reported under it
//! was the rewrite.
//!
//! `path_racer OPENED NAMED SECONDS`: both paths the same length; prints the number of
//! successful opens when done.

use std::{
    sync::atomic::{AtomicBool, AtomicU8, Ordering},
    thread,
    time::{Duration, Instant},
};

const CAP: usize = 256;

/// The path the opener passes to open(2), rewritten concurrently.
static BUF: [AtomicU8; CAP] = [const { AtomicU8::new(0) }; CAP];
static STOP: AtomicBool = AtomicBool::new(false);

fn write(path: &[u8]) {
    for (slot, b) in BUF.iter().zip(path.iter().chain(std::iter::once(&0))) {
        slot.store(*b, Ordering::Relaxed);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, opened, named, seconds] = &args[..] else {
        eprintln!("usage: path_racer OPENED NAMED SECONDS");
        std::process::exit(2);
    };
    let (opened, named) = (opened.as_bytes().to_vec(), named.as_bytes().to_vec());
    assert_eq!(opened.len(), named.len(), "both paths the same length");
    assert!(opened.len() < CAP);
    // SAFETY: plain syscalls; dropping to nobody before anything is opened.
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setgid(65534), 0);
        assert_eq!(libc::setuid(65534), 0);
    }
    write(&opened);
    let flipper = {
        let (opened, named) = (opened.clone(), named.clone());
        thread::spawn(move || {
            while !STOP.load(Ordering::Relaxed) {
                write(&named);
                write(&opened);
            }
        })
    };
    let end = Instant::now() + Duration::from_secs_f64(seconds.parse().unwrap_or(1.0));
    let mut ok = 0u64;
    while Instant::now() < end {
        // SAFETY: BUF is NUL-terminated (CAP > the path's length); AtomicU8 is a u8.
        let fd = unsafe { libc::open(BUF.as_ptr().cast(), libc::O_RDONLY) };
        if fd >= 0 {
            ok += 1;
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
        }
    }
    STOP.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    println!("opened {ok}");
}
