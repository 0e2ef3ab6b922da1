//! What a check of a qcow2 image found and repaired (QEMU's `BdrvCheckResult`, as
//! `qemu-img check` reports it): the counts, the messages naming each problem, qemu-img's
//! human and JSON output and its exit code.

use std::fmt::Write as _;

/// What a check may repair (`qemu-img check -r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Only look (no `-r`): the image is opened read-only.
    None,
    /// `-r leaks`: free leaked clusters, and fix `OFLAG_COPIED` flags when nothing else is
    /// wrong.
    Leaks,
    /// `-r all`: also raise refcounts that are too low, rebuild the refcount structure
    /// when it cannot be trusted, and fix `OFLAG_COPIED` flags whatever else is wrong.
    All,
}

impl Repair {
    /// Whether leaked clusters are freed (QEMU's `BDRV_FIX_LEAKS`).
    pub fn fixes_leaks(self) -> bool {
        self != Repair::None
    }

    /// Whether corruptions are repaired (QEMU's `BDRV_FIX_ERRORS`).
    pub fn fixes_errors(self) -> bool {
        self == Repair::All
    }

    /// Whether anything is written.
    pub fn writes(self) -> bool {
        self != Repair::None
    }
}

/// The result of [`check`](super::check()): the categories of `qemu-img check`, and a breakdown
/// of where the corruptions were found.
///
/// After a repair that fixed something the image is checked again, as `qemu-img check -r`
/// does: the counts are then the second check's, with the `*_fixed` counts of the repair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that may corrupt data (wrong refcounts, bad entries, wrong `OFLAG_COPIED`)
    /// left unrepaired.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (wasted space, no harm).
    pub leaks: u64,
    /// Errors that kept the check from looking at something (I/O errors, unreadable
    /// refcount blocks).
    pub check_errors: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters the repair freed.
    pub leaks_fixed: u64,
    /// Of the corruptions found, the `OFLAG_COPIED` flags that disagreed with a refcount.
    pub oflag_copied_mismatches: u64,
    /// Of the corruptions found, the clusters referenced more often than the refcount width
    /// can count.
    pub refcount_overflows: u64,
    /// Of the corruptions found, the refcount table entries naming a block that is
    /// misaligned, outside the image or shared.
    pub refcount_block_errors: u64,
    /// The end of the last cluster in use or counted (0 if none).
    pub image_end_offset: u64,
    /// The clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters of the active L1 table with a host cluster (data or compressed).
    pub allocated_clusters: u64,
    /// Of those, the ones not right after the previous one of their L2 table (compressed
    /// clusters always count).
    pub fragmented_clusters: u64,
    /// Of those, the compressed ones.
    pub compressed_clusters: u64,
    /// One line per problem found or repaired, as `qemu-img check` prints them on stderr
    /// (`Leaked cluster 9 refcount=1 reference=0`, `Repairing OFLAG_COPIED data cluster:
    /// ...`).
    pub messages: Vec<String>,
    /// Why the check stopped before it finished (qemu-img's `Check failed: ...`), if it did.
    pub failure: Option<String>,
}

impl CheckReport {
    /// qemu-img's exit code: 1 if the check failed or had errors, 2 for corruptions, 3 for
    /// leaks only, 0 for a clean image.
    pub fn exit_code(&self) -> u8 {
        if self.failure.is_some() || self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether the repair fixed something (and the counts are those of the check after it).
    pub fn repaired(&self) -> bool {
        self.corruptions_fixed + self.leaks_fixed > 0
    }

    /// The report as `qemu-img check` prints it on stdout (without the per-problem
    /// messages). Empty if the check failed: qemu-img prints only the failure then.
    pub fn human(&self) -> String {
        let mut out = String::new();
        if self.failure.is_some() {
            return out;
        }
        if self.repaired() {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            );
        }
        if self.corruptions + self.leaks + self.check_errors == 0 {
            out.push_str("No errors were found on the image.\n");
        }
        if self.corruptions > 0 {
            let _ = write!(
                out,
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                self.corruptions
            );
        }
        if self.leaks > 0 {
            let _ = write!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                self.leaks
            );
        }
        if self.check_errors > 0 {
            let _ = write!(
                out,
                "\n{} internal errors have occurred during the check.\n",
                self.check_errors
            );
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let allocated = self.allocated_clusters as f64;
            let _ = writeln!(
                out,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                allocated * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / allocated,
                self.compressed_clusters as f64 * 100.0 / allocated
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(out, "Image end offset: {}", self.image_end_offset);
        }
        out
    }

    /// The report as `qemu-img check --output json` prints it for the image `filename`:
    /// the counts that are not zero, and always `check-errors`, `filename` and `format`, in
    /// qemu-img's order.
    /// Empty if the check failed.
    pub fn json(&self, filename: &str) -> String {
        if self.failure.is_some() {
            return String::new();
        }
        // In the order qemu-img prints them (its dictionary's hash order).
        let count = |key: &str, value: u64| (value != 0).then(|| format!("\"{key}\": {value}"));
        let fields: Vec<String> = [
            count("image-end-offset", self.image_end_offset),
            count("compressed-clusters", self.compressed_clusters),
            count("total-clusters", self.total_clusters),
            count("corruptions", self.corruptions),
            count("corruptions-fixed", self.corruptions_fixed),
            Some(format!("\"check-errors\": {}", self.check_errors)),
            count("leaks", self.leaks),
            count("leaks-fixed", self.leaks_fixed),
            count("allocated-clusters", self.allocated_clusters),
            Some(format!("\"filename\": \"{}\"", json_escape(filename))),
            Some("\"format\": \"qcow2\"".to_owned()),
            count("fragmented-clusters", self.fragmented_clusters),
        ]
        .into_iter()
        .flatten()
        .collect();
        format!("{{\n    {}\n}}\n", fields.join(",\n    "))
    }
}

/// `text` as the inside of a JSON string.
fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_qemu_img() {
        let clean = CheckReport::default();
        assert_eq!(clean.exit_code(), 0);
        assert_eq!(CheckReport { leaks: 2, ..CheckReport::default() }.exit_code(), 3);
        assert_eq!(CheckReport { leaks: 2, corruptions: 1, ..clean.clone() }.exit_code(), 2);
        assert_eq!(CheckReport { corruptions: 1, check_errors: 1, ..clean.clone() }.exit_code(), 1);
        assert_eq!(CheckReport { failure: Some("x".into()), ..clean }.exit_code(), 1);
    }

    #[test]
    fn human_and_json_output() {
        let report = CheckReport {
            leaks: 3,
            image_end_offset: 458752,
            total_clusters: 128,
            allocated_clusters: 2,
            ..CheckReport::default()
        };
        assert_eq!(
            report.human(),
            "\n3 leaked clusters were found on the image.\nThis means waste of disk space, but \
             no harm to data.\n2/128 = 1.56% allocated, 0.00% fragmented, 0.00% compressed \
             clusters\nImage end offset: 458752\n"
        );
        let json = report.json("a \"b\".qcow2");
        assert!(json.contains("\"leaks\": 3,\n"), "{json}");
        assert!(json.contains("\"check-errors\": 0,\n"), "{json}");
        assert!(json.contains("\"filename\": \"a \\\"b\\\".qcow2\""), "{json}");
        assert!(!json.contains("corruptions"), "{json}");
    }
}
