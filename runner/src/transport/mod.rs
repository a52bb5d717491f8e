//! Talking to remote hosts. So far: turning an argv into the one command
//! line an SSH server hands to the user's login shell.

pub mod quote;
