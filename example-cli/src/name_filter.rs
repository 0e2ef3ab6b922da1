//! Which figures a perf example prints: `coroutine_perf yield future` runs the figures whose
//! names contain `yield` or `future`; with no word, all of them (as `cargo bench` filters).

use lexopt::{Arg, ValueExt};

use crate::{CommandLine, Stop};

/// The words a figure's name must contain one of (any name when there are none).
#[derive(Debug, Default)]
pub struct NameFilter {
    words: Vec<String>,
}

impl NameFilter {
    /// The filter from the rest of `line`: every operand is a word; there are no options
    /// but `--help`.
    ///
    /// # Errors
    ///
    /// [`Stop::Help`], or an option (which would otherwise be taken for a word).
    pub fn parse(line: &mut CommandLine) -> Result<Self, Stop> {
        let mut words = Vec::new();
        while let Some(arg) = line.next_arg()? {
            match arg {
                Arg::Value(word) => words.push(word.string()?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        Ok(NameFilter { words })
    }

    /// Whether the figure `name` is selected.
    pub fn selects(&self, name: &str) -> bool {
        self.words.is_empty() || self.words.iter().any(|word| name.contains(word.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(args: &[&str]) -> Result<NameFilter, Stop> {
        NameFilter::parse(&mut CommandLine::from_args("perf", "usage", args.iter().copied()))
    }

    #[test]
    fn no_word_selects_every_name() {
        assert!(filter(&[]).unwrap().selects("lifecycle"));
    }

    #[test]
    fn a_name_is_selected_by_any_word_it_contains() {
        let filter = filter(&["future/", "yield"]).unwrap();
        assert!(filter.selects("future/ready"));
        assert!(filter.selects("raw_corosensei_yield"));
        assert!(!filter.selects("lifecycle"));
        assert!(!filter.selects("join/spawn_join"));
    }

    #[test]
    fn options_are_refused_not_taken_for_words() {
        assert_eq!(
            filter(&["--bench"]).unwrap_err(),
            Stop::Error("invalid option '--bench'".into())
        );
        assert_eq!(filter(&["yield", "--help"]).unwrap_err(), Stop::Help);
    }
}
