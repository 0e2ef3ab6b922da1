//! A program's command line: `lexopt`'s parser with `qemu-img`'s conventions around it.
//!
//! `-h` / `--help` prints the usage to stdout and exits with status 0; a bad argument prints
//! `<program>: <why>` and a hint to stderr and exits with status 1.

use std::ffi::OsString;
use std::ops::RangeInclusive;

use lexopt::{Arg, ValueExt};

use crate::numbers;

/// Why parsing stopped before the program could run.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// `-h` or `--help`: print the usage and succeed.
    Help,
    /// A bad command line, and why.
    Error(String),
}

impl From<lexopt::Error> for Stop {
    fn from(error: lexopt::Error) -> Self {
        Stop::Error(error.to_string())
    }
}

impl From<std::io::Error> for Stop {
    fn from(error: std::io::Error) -> Self {
        Stop::Error(error.to_string())
    }
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        Stop::Error(message)
    }
}

impl From<&str> for Stop {
    fn from(message: &str) -> Self {
        Stop::Error(message.to_owned())
    }
}

/// The arguments of one program, with its name and usage text.
pub struct CommandLine {
    program: &'static str,
    usage: &'static str,
    parser: lexopt::Parser,
}

impl std::fmt::Debug for CommandLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandLine").field("program", &self.program).finish_non_exhaustive()
    }
}

impl CommandLine {
    /// The process's arguments.
    pub fn from_env(program: &'static str, usage: &'static str) -> Self {
        CommandLine { program, usage, parser: lexopt::Parser::from_env() }
    }

    /// Given arguments (without the program's name).
    pub fn from_args<I>(program: &'static str, usage: &'static str, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        CommandLine { program, usage, parser: lexopt::Parser::from_args(args) }
    }

    /// The next option or operand; [`Stop::Help`] for `-h` / `--help`.
    ///
    /// # Errors
    ///
    /// [`Stop::Help`], or a value given to a flag (`--json=1`).
    pub fn next_arg(&mut self) -> Result<Option<Arg<'_>>, Stop> {
        match self.parser.next()? {
            Some(Arg::Short('h') | Arg::Long("help")) => Err(Stop::Help),
            arg => Ok(arg),
        }
    }

    /// The value of the option just returned (`-c 10`, `-c10`, `--count=10`).
    ///
    /// # Errors
    ///
    /// A missing value, or one that is not UTF-8.
    pub fn value(&mut self) -> Result<String, Stop> {
        Ok(self.parser.value()?.string()?)
    }

    /// The value of the option just returned, as an integer in `range` (see
    /// [`parse_integer`](numbers::parse_integer)); `what` names it in the error.
    ///
    /// # Errors
    ///
    /// What [`value`](Self::value) refuses, and what is not an integer in `range`.
    pub fn integer(&mut self, what: &str, range: RangeInclusive<i64>) -> Result<i64, Stop> {
        Ok(numbers::parse_integer(&self.value()?, what, range)?)
    }

    /// The value of the option just returned, as a size in bytes in `range` (see
    /// [`parse_size`](numbers::parse_size)); `what` names it in the error.
    ///
    /// # Errors
    ///
    /// What [`value`](Self::value) refuses, and what is not a size in `range`.
    pub fn size(&mut self, what: &str, range: RangeInclusive<u64>) -> Result<u64, Stop> {
        Ok(numbers::parse_size(&self.value()?, what, range)?)
    }

    /// Runs `parse` over the arguments; on [`Stop`] exits the process as `qemu-img` does
    /// (the usage on stdout and status 0 for help; the reason on stderr and status 1 for an
    /// error).
    pub fn parse<T>(mut self, parse: impl FnOnce(&mut Self) -> Result<T, Stop>) -> T {
        match parse(&mut self) {
            Ok(parsed) => parsed,
            Err(Stop::Help) => {
                println!("{}", self.usage);
                std::process::exit(0)
            }
            Err(Stop::Error(why)) => {
                eprintln!("{}: {why}", self.program);
                eprintln!("Try '{} --help' for more information.", self.program);
                std::process::exit(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = "usage: test [-c COUNT] [-o OFFSET] [--json] FILE";

    /// The test program's arguments: (count, offset, json, file).
    fn parse(args: &[&str]) -> Result<(i64, u64, bool, String), Stop> {
        let mut line = CommandLine::from_args("test", USAGE, args.iter().copied());
        let (mut count, mut offset, mut json, mut file) = (1, 0, false, None);
        while let Some(arg) = line.next_arg()? {
            match arg {
                Arg::Short('c') | Arg::Long("count") => {
                    count = line.integer("request count", 1..=100)?
                }
                Arg::Short('o') | Arg::Long("offset") => {
                    offset = line.size("offset", 0..=u64::MAX)?
                }
                Arg::Long("json") => json = true,
                Arg::Value(value) if file.is_none() => file = Some(value.string()?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        Ok((count, offset, json, file.ok_or("FILE is missing")?))
    }

    #[test]
    fn options_take_values_in_every_getopt_spelling() {
        let expected = Ok((16, 1 << 20, true, "disk.img".to_owned()));
        assert_eq!(parse(&["-c", "0x10", "-o", "1M", "--json", "disk.img"]), expected);
        assert_eq!(parse(&["-c16", "--offset=1M", "disk.img", "--json"]), expected);
        assert_eq!(parse(&["--count", "020", "-o1024k", "--json", "disk.img"]), expected);
    }

    #[test]
    fn help_stops_parsing_wherever_it_is() {
        assert_eq!(parse(&["--help"]), Err(Stop::Help));
        assert_eq!(parse(&["-c", "3", "-h", "disk.img"]), Err(Stop::Help));
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let error = |args: &[&str]| match parse(args) {
            Err(Stop::Error(why)) => why,
            other => panic!("{args:?} parsed as {other:?}"),
        };
        assert_eq!(error(&["-c", "1k", "f"]), "Invalid request count specified: '1k'.");
        assert_eq!(error(&["--json=yes", "f"]), "unexpected argument for option '--json': \"yes\"");
        assert_eq!(error(&["--bogus", "f"]), "invalid option '--bogus'");
        assert_eq!(error(&["f", "g"]), "unexpected argument \"g\"");
        assert_eq!(error(&["-c"]), "missing argument for option '-c'");
        assert_eq!(error(&[]), "FILE is missing");
    }
}
