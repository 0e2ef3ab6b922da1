//! The command line of aiocoro's example programs, in one place: [`CommandLine`] (`lexopt`'s
//! parser with `qemu-img`'s conventions for `--help` and errors), [`numbers`] (integers and
//! sizes read as `qemu-img` reads them) and [`NameFilter`] (which figures a perf example
//! runs).
//!
//! ```
//! use example_cli::{Arg, CommandLine};
//!
//! let mut line = CommandLine::from_args("demo", "usage: demo [-o OFFSET]", ["-o", "1M"]);
//! let mut offset = 0;
//! while let Some(arg) = line.next_arg().unwrap() {
//!     match arg {
//!         Arg::Short('o') => offset = line.size("offset", 0..=u64::MAX).unwrap(),
//!         other => panic!("{:?}", other.unexpected()),
//!     }
//! }
//! assert_eq!(offset, 1 << 20);
//! ```

mod command_line;
mod name_filter;
pub mod numbers;

pub use command_line::{CommandLine, Stop};
pub use lexopt::{Arg, ValueExt};
pub use name_filter::NameFilter;
