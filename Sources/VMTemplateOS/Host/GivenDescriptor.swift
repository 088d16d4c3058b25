import CLinuxHost
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A descriptor vmtemplate was handed rather than opened: a tap or a disk image that its caller
/// opened with the caller's own rights (an inherited `fd=N` on the command line, or one deposited
/// on `serve`'s descriptor socket, as Cloud Hypervisor's `vm.add-net` takes tap descriptors).
/// vmtemplate then opens no path and enters no namespace on the caller's behalf: what the caller
/// could not open, it cannot hand over.
///
/// What a descriptor is comes from the kernel (`fstat`, `F_GETFL`, `TUNGETIFF`), never from the
/// caller's word; anything that is not an open tap or a readable regular file or block device is
/// refused. The object owns its descriptor and closes it when the last reference goes.
public final class GivenDescriptor: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case tap
        case disk
    }

    /// Open, close-on-exec, this process's own (a duplicate of what was handed over).
    public let raw: Int32
    public let kind: Kind
    /// How messages name it: `fd 3`, or the token it was deposited under.
    public let label: String
    /// A tap's interface name (`TUNGETIFF`), when it is one vmtemplate prints.
    public let tapName: String?
    /// A disk opened read-write (`O_RDWR`); a tap is always read-write.
    public let writable: Bool
    public let isBlockDevice: Bool
    /// Handed over by root or the store's owner (an inherited `fd=N`, or the owner's deposit):
    /// one whose image header may be believed after it was read, since nobody else can change it
    /// between that read and QEMU's. A qcow2 header is believed only then.
    public let fromOwner: Bool
    /// Set once QEMU holds a copy (``markAttached()``): its token is spent even if the request
    /// that attached it fails later.
    private let attachedFlag = Atomic<Bool>(false)

    /// The tun driver's character device, `/dev/net/tun` (10, 200).
    static let tunDevice = (major: UInt32(10), minor: UInt32(200))
    static let tapFlag: Int32 = 0x0002
    static let noPacketInfoFlag: Int32 = 0x1000

    private init(raw: Int32, kind: Kind, label: String, tapName: String?, writable: Bool, isBlockDevice: Bool, fromOwner: Bool) {
        self.raw = raw
        self.kind = kind
        self.label = label
        self.tapName = tapName
        self.writable = writable
        self.isBlockDevice = isBlockDevice
        self.fromOwner = fromOwner
    }

    public var isAttached: Bool { attachedFlag.load(ordering: .acquiring) }

    public func markAttached() { attachedFlag.store(true, ordering: .releasing) }

    /// The file systems a regular file handed over may be on: local disk and memory file systems,
    /// where reading and closing never wait for another process. Not FUSE (its daemon, maybe the
    /// sender's, answers or not), not network file systems, not procfs, sysfs and the like (whose
    /// files answer their reader: root here, QEMU later), not memfd's internal mount.
    static let localFileSystems: Set<Int> = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0xF2F5_2010, // f2fs
        0x794C_7630, // overlayfs (a container's root)
    ]

    deinit { close(raw) }

    public static func == (lhs: GivenDescriptor, rhs: GivenDescriptor) -> Bool { lhs === rhs }

    public var description: String { label }

    /// Inspects a duplicate of `descriptor` (which stays the caller's) and keeps it if it is a tap
    /// or a disk; `label` names it in errors.
    public static func inspecting(_ descriptor: Int32, label: String, fromOwner: Bool) throws -> GivenDescriptor {
        let copy = fcntl(descriptor, F_DUPFD_CLOEXEC, 3)
        guard copy >= 0 else {
            throw VMTemplateError(.invalidArgument, "\(label) is not an open descriptor (\(errnoText())): open the tap or disk image and pass its number.", cause: SystemCallError("fcntl"))
        }
        do {
            return try adopting(copy, label: label, fromOwner: fromOwner)
        } catch {
            close(copy)
            throw error
        }
    }

    /// Keeps `descriptor` (this process's; closed by the caller if this throws) if it is a tap or
    /// a disk. For another user's descriptor, run this on a thread of its own: `fstat` and
    /// `fstatfs` of a file on a FUSE mount wait for its daemon.
    public static func adopting(_ descriptor: Int32, label: String, fromOwner: Bool) throws -> GivenDescriptor {
        let flags = fcntl(descriptor, F_GETFL)
        guard flags >= 0 else { throw VMTemplateError(.invalidArgument, "\(label) is not an open descriptor: \(errnoText()).", cause: SystemCallError("fcntl")) }
        // An O_PATH handle opens nothing: reopening it would read with the server's rights what its
        // sender could only name.
        guard flags & clinuxhost_o_path() == 0 else {
            throw VMTemplateError(.invalidArgument, "\(label) is an O_PATH handle, which opens nothing: open the tap or disk image itself.")
        }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw VMTemplateError(.ioError, "cannot inspect \(label): \(errnoText()).", cause: SystemCallError("fstat")) }
        let access = flags & O_ACCMODE
        switch info.st_mode & S_IFMT {
        case S_IFCHR:
            // Only then TUNGETIFF: the same ioctl number means something else to other drivers.
            guard deviceNumbers(info.st_rdev) == tunDevice else {
                throw VMTemplateError(.invalidArgument, "\(label) is a character device, not a tap (/dev/net/tun): pass a tap's descriptor, or a disk image's.")
            }
            var name = [CChar](repeating: 0, count: 16)
            var tapFlags: Int32 = 0
            let result = clinuxhost_tap_info(descriptor, &name, &tapFlags)
            guard result == 0 else {
                throw VMTemplateError(.invalidArgument, "\(label) is /dev/net/tun but attached to no interface: attach it to your tap first (TUNSETIFF).", cause: SystemCallError("TUNGETIFF", code: -result))
            }
            guard tapFlags & tapFlag != 0, tapFlags & noPacketInfoFlag != 0 else {
                throw VMTemplateError(.invalidArgument, "\(label) is \(tapFlags & tapFlag == 0 ? "a tun (layer 3) device" : "a tap with packet information") : QEMU needs a tap opened with IFF_TAP | IFF_NO_PI (and IFF_VNET_HDR for offloads).")
            }
            guard access == O_RDWR else {
                throw VMTemplateError(.invalidArgument, "\(label) is a tap not opened read-write: open /dev/net/tun with O_RDWR.")
            }
            let text = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            return GivenDescriptor(raw: descriptor, kind: .tap, label: label, tapName: TapDevice.isValidName(text) ? text : nil, writable: true, isBlockDevice: false, fromOwner: fromOwner)
        case S_IFREG, S_IFBLK:
            if (info.st_mode & S_IFMT) == S_IFREG {
                let type = clinuxhost_filesystem_type(descriptor)
                guard localFileSystems.contains(type) else {
                    throw VMTemplateError(.invalidArgument, "\(label) is a file on a file system that is not a local disk or memory one (type 0x\(String(type, radix: 16))): hand over an image on ext4, xfs, btrfs, tmpfs, f2fs or overlayfs, or a block device.")
                }
            }
            guard access == O_RDONLY || access == O_RDWR else {
                throw VMTemplateError(.invalidArgument, "\(label) is open write-only: open the disk image O_RDONLY (for readonly=on or overlay=on) or O_RDWR.")
            }
            // QEMU writes with pwrite(2), which O_APPEND turns into writes at the end.
            guard flags & O_APPEND == 0 else {
                throw VMTemplateError(.invalidArgument, "\(label) is open with O_APPEND, which would put every write at the end of the image: open it without.")
            }
            return GivenDescriptor(raw: descriptor, kind: .disk, label: label, tapName: nil, writable: access == O_RDWR, isBlockDevice: (info.st_mode & S_IFMT) == S_IFBLK, fromOwner: fromOwner)
        default:
            throw VMTemplateError(.invalidArgument, "\(label) is neither a tap nor a regular file or block device: pass a tap's descriptor, or a disk image's.")
        }
    }

    /// glibc's major(3) and minor(3), which are macros Swift does not see.
    static func deviceNumbers(_ device: dev_t) -> (major: UInt32, minor: UInt32) {
        let value = UInt64(device)
        return (UInt32(truncatingIfNeeded: ((value >> 8) & 0xfff) | ((value >> 32) & ~UInt64(0xfff))),
                UInt32(truncatingIfNeeded: (value & 0xff) | ((value >> 12) & ~UInt64(0xff))))
    }

    /// A new close-on-exec copy, for whoever closes its own (QEMU gets it over QMP).
    public func duplicate() throws -> Int32 {
        let copy = fcntl(raw, F_DUPFD_CLOEXEC, 3)
        guard copy >= 0 else { throw VMTemplateError(.ioError, "cannot duplicate \(label): \(errnoText()).", cause: SystemCallError("fcntl")) }
        return copy
    }

    /// `N` of an `fd=N` that this process inherited (the CLI's caller opened it): a decimal number
    /// from 3 (0 to 2 are the terminal's) below 65536, without close-on-exec (every descriptor
    /// this process opens itself has it, so one of its own is never taken for the caller's). The
    /// original gets close-on-exec then: nothing this process starts inherits it.
    public static func inherited(_ text: String) throws -> GivenDescriptor {
        guard text.utf8.count <= 5, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let number = Int32(text), number >= 3 else {
            throw VMTemplateError(.invalidArgument, "fd=\(TerminalText.escape(String(text.prefix(40)))) is not a descriptor number: give the number (3 or more) of a descriptor this command inherited, e.g. fd=3 with 3</srv/disk.img.")
        }
        let flags = fcntl(number, F_GETFD)
        guard flags >= 0, flags & FD_CLOEXEC == 0 else {
            throw VMTemplateError(.invalidArgument, "fd \(number) is not an open descriptor this command inherited: open the tap or disk image as descriptor \(number) when starting it (e.g. \(number)</srv/disk.img).")
        }
        let given = try inspecting(number, label: "fd \(number)", fromOwner: true)
        _ = fcntl(number, F_SETFD, flags | FD_CLOEXEC)
        return given
    }
}
