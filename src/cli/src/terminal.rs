//! Raw mode for an interactive console: when COM1 is on stdio and stdin is a terminal,
//! keystrokes (Ctrl-C included) go to the guest unechoed and unbuffered. The original
//! settings are restored when faultvisor ends, even after an internal error.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin in raw mode if it is a terminal; returns whether it did.
pub fn enter_raw_mode() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return false;
    }
    // SAFETY: termios is plain old data; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios for tcgetattr to fill.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return false;
    }
    let saved = t;
    t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `t` is a fully initialized termios derived from the current settings.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
        return false;
    }
    *saved_settings() = Some(saved);
    true
}

fn saved_settings() -> std::sync::MutexGuard<'static, Option<libc::termios>> {
    SAVED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Restores the settings saved by [`enter_raw_mode`], if any.
pub fn restore() {
    if let Some(t) = saved_settings().take() {
        // SAFETY: `t` is the termios tcgetattr returned for this descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}
