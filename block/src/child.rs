//! What a child node is to its parent: its name and its role bits (QEMU's `BdrvChild` name
//! and `BdrvChildRole`).

use std::borrow::Cow;
use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use crate::graph::EdgeLabel;

/// What a child's contents are to its parent (QEMU's `BdrvChildRole` bits), combined with
/// `|`. A parent may give [`ChildRole::PRIMARY`] and [`ChildRole::FILTERED`] to one child
/// each at most; the graph refuses more.
///
/// The block layer reads the bits when it combines limits: requests reaching a node must
/// satisfy every child whose role has [`DATA`](ChildRole::DATA),
/// [`FILTERED`](ChildRole::FILTERED) or [`COW`](ChildRole::COW) (see
/// [`BlockDriver::alignment`](crate::BlockDriver::alignment)).
///
/// ```
/// use aiocoro_block::ChildRole;
///
/// let image = ChildRole::DATA | ChildRole::METADATA | ChildRole::PRIMARY;
/// assert_eq!(image, ChildRole::IMAGE);
/// assert!(image.contains(ChildRole::DATA));
/// assert!(!image.contains(ChildRole::COW));
/// assert_eq!(format!("{:?}", ChildRole::FILTERED | ChildRole::PRIMARY), "FILTERED | PRIMARY");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChildRole(u8);

impl ChildRole {
    /// No role bit: a child the parent holds but whose contents it does not show (a
    /// bitmap's store, say).
    pub const NONE: ChildRole = ChildRole(0);
    /// The child stores data the parent shows its users, in whatever layout (a format's
    /// file without a separate data file; each copy of a mirror or quorum).
    pub const DATA: ChildRole = ChildRole(1 << 0);
    /// The child stores the parent's metadata (a format's file: qcow2's tables).
    pub const METADATA: ChildRole = ChildRole(1 << 1);
    /// The parent shows the child's contents as they are, at the same offsets (a filter's
    /// child: throttle, a fault injector, `raw` without a window). One per parent at most.
    pub const FILTERED: ChildRole = ChildRole(1 << 2);
    /// The parent reads what it does not store from the child (copy-on-write: a format's
    /// backing image).
    pub const COW: ChildRole = ChildRole(1 << 3);
    /// The child that stands for the parent (whose file name names it best). One per
    /// parent at most.
    pub const PRIMARY: ChildRole = ChildRole(1 << 4);
    /// A format's image file: `DATA | METADATA | PRIMARY`.
    pub const IMAGE: ChildRole = Self::DATA.union(Self::METADATA).union(Self::PRIMARY);

    /// The bits with their names, for `Debug`.
    const NAMES: [(ChildRole, &'static str); 5] = [
        (ChildRole::DATA, "DATA"),
        (ChildRole::METADATA, "METADATA"),
        (ChildRole::FILTERED, "FILTERED"),
        (ChildRole::COW, "COW"),
        (ChildRole::PRIMARY, "PRIMARY"),
    ];

    /// The bits of both.
    pub const fn union(self, other: ChildRole) -> ChildRole {
        ChildRole(self.0 | other.0)
    }

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: ChildRole) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set here.
    pub const fn intersects(self, other: ChildRole) -> bool {
        self.0 & other.0 != 0
    }
}

impl BitOr for ChildRole {
    type Output = ChildRole;

    fn bitor(self, other: ChildRole) -> ChildRole {
        self.union(other)
    }
}

impl BitOrAssign for ChildRole {
    fn bitor_assign(&mut self, other: ChildRole) {
        self.0 |= other.0;
    }
}

impl fmt::Debug for ChildRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = ChildRole::NAMES.iter().filter(|(bit, _)| self.contains(*bit));
        match names.next() {
            None => f.write_str("NONE"),
            Some((_, first)) => {
                f.write_str(first)?;
                names.try_for_each(|(_, name)| write!(f, " | {name}"))
            }
        }
    }
}

/// The label of a child edge of the block graph: the child's name, unique among its
/// parent's children (`file`, `backing`, `child0`...), and its [`ChildRole`]. The graph finds
/// a child by its name ([`Graph::child`](crate::graph::Graph::child)).
///
/// ```
/// use aiocoro_block::{ChildLabel, ChildRole};
///
/// let copy = ChildLabel::new("child1", ChildRole::DATA);
/// assert_eq!(copy.name(), "child1");
/// assert_eq!(ChildLabel::backing().role(), ChildRole::COW);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChildLabel {
    name: Cow<'static, str>,
    role: ChildRole,
}

impl ChildLabel {
    /// A child named `name` in `role`.
    pub fn new(name: impl Into<Cow<'static, str>>, role: ChildRole) -> ChildLabel {
        ChildLabel { name: name.into(), role }
    }

    /// A format's image file: `file`, [`ChildRole::IMAGE`] (qcow2's file).
    pub fn image_file() -> ChildLabel {
        ChildLabel::new("file", ChildRole::IMAGE)
    }

    /// A filter's child: `file`, `FILTERED | PRIMARY` (raw without a window, a throttle).
    pub fn filtered_file() -> ChildLabel {
        ChildLabel::new("file", ChildRole::FILTERED | ChildRole::PRIMARY)
    }

    /// A format's backing image: `backing`, [`ChildRole::COW`].
    pub fn backing() -> ChildLabel {
        ChildLabel::new("backing", ChildRole::COW)
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's role.
    pub fn role(&self) -> ChildRole {
        self.role
    }
}

/// Two children conflict when they have the same name, or both have a role one child may
/// have only (`PRIMARY`, `FILTERED`).
impl EdgeLabel for ChildLabel {
    fn name(&self) -> &str {
        &self.name
    }

    fn conflict(&self, other: &ChildLabel) -> Option<String> {
        if self.name == other.name {
            return Some(format!("it has a child named '{}'", self.name));
        }
        let (_, what) = [(ChildRole::PRIMARY, "PRIMARY"), (ChildRole::FILTERED, "FILTERED")]
            .into_iter()
            .find(|(bit, _)| self.role.contains(*bit) && other.role.contains(*bit))?;
        Some(format!(
            "its child '{}' is {what}, and a parent has one {what} child at most",
            other.name
        ))
    }
}
