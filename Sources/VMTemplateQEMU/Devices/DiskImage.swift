import CLinuxHost
import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A disk image opened for a clone, checked before QEMU sees it.
///
/// vmtemplate opens the file (with the caller's rights) and passes the descriptor to QEMU
/// (`add-fd`, `/dev/fdset/N`): QEMU may run as its own unprivileged user and never opens a disk
/// by path, and a qcow2 image's own backing file is refused rather than followed, since its name
/// is whatever the image's author wrote.
public struct DiskImage: Sendable {
    /// Open, close-on-exec; the caller closes it once QEMU has its copy.
    public let descriptor: Int32
    public let path: String
    public let format: DiskFormat
    /// The size the guest sees.
    public let virtualSizeBytes: UInt64
    public let writable: Bool

    static let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]  // "QFI\xfb"
    /// The largest disk accepted (qemu-img's own limit for qcow2 is 64 TiB).
    public static let maxSizeBytes: UInt64 = 1 << 46

    /// Opens `path` read-only or read-write and checks that it is a regular file or block device
    /// in the stated format, without a backing file of its own.
    public static func open(path: String, format: DiskFormat, writable: Bool) throws -> DiskImage {
        let shown = TerminalText.escape(path)
        // First a handle that opens nothing (O_PATH), found without following any symbolic link
        // (openat2 RESOLVE_NO_SYMLINKS): whoever can write a directory on the way cannot point
        // root at another file, and a FIFO or a device file is never really opened.
        let handle = clinuxhost_open_beneath_no_symlinks(path, clinuxhost_o_path() | O_CLOEXEC)
        guard handle >= 0 else {
            let code = -handle
            switch code {
            case ENOENT: throw VMTemplateError(.notFound, "disk image '\(shown)' does not exist: check path=.", cause: SystemCallError("openat2", code: code))
            case ELOOP: throw VMTemplateError(.invalidArgument, "disk image path '\(shown)' goes through a symbolic link, which vmtemplate does not follow: give the real path (realpath FILE).", cause: SystemCallError("openat2", code: code))
            case EACCES, EPERM: throw VMTemplateError(.permissionDenied, "disk image '\(shown)' cannot be reached (\(errnoText(code))): check the permissions of its directories.", cause: SystemCallError("openat2", code: code))
            default: throw VMTemplateError(.ioError, "disk image '\(shown)' cannot be opened: \(errnoText(code)).", cause: SystemCallError("openat2", code: code))
            }
        }
        defer { close(handle) }
        var kindCheck = stat()
        guard fstat(handle, &kindCheck) == 0 else { throw VMTemplateError(.ioError, "cannot inspect disk image '\(shown)': \(errnoText()).") }
        guard (kindCheck.st_mode & S_IFMT) == S_IFREG || (kindCheck.st_mode & S_IFMT) == S_IFBLK else {
            throw VMTemplateError(.invalidArgument, "disk image '\(shown)' is not a regular file or a block device.")
        }
        // The same inode, now opened for real (the handle's /proc link is not a path anyone else
        // can change).
        let descriptor = Glibc.open("/proc/self/fd/\(handle)", (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
        do {
            var info = stat()
            guard fstat(descriptor, &info) == 0 else { throw VMTemplateError(.ioError, "cannot inspect disk image '\(shown)': \(errnoText()).") }
            let kind = info.st_mode & S_IFMT
            guard kind == S_IFREG || kind == S_IFBLK else {
                throw VMTemplateError(.invalidArgument, "disk image '\(shown)' is not a regular file or a block device.")
            }
            let flags = fcntl(descriptor, F_GETFL)
            _ = fcntl(descriptor, F_SETFL, flags & ~O_NONBLOCK)
            var header = [UInt8](repeating: 0, count: 512)
            let read = header.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, 512, 0) }
            guard read >= 0 else { throw VMTemplateError(.ioError, "cannot read disk image '\(shown)': \(errnoText()).") }
            let isQCOW2 = read >= 104 && Array(header[0..<4]) == qcow2Magic
            let size: UInt64
            switch format {
            case .raw:
                if isQCOW2 {
                    throw VMTemplateError(.invalidArgument, "disk image '\(shown)' starts like a qcow2 image but format=raw was given: pass format=qcow2 if it is one.")
                }
                let end = lseek(descriptor, 0, SEEK_END)
                guard end >= 0 else { throw VMTemplateError(.ioError, "cannot find the size of '\(shown)': \(errnoText()).") }
                size = UInt64(end)
            case .qcow2:
                guard isQCOW2 else { throw VMTemplateError(.invalidArgument, "disk image '\(shown)' is not a qcow2 image: pass format=raw, or convert it (qemu-img convert -O qcow2).") }
                func bigEndian(_ offset: Int, _ count: Int) -> UInt64 {
                    header[offset..<(offset + count)].reduce(0) { $0 << 8 | UInt64($1) }
                }
                guard [2, 3].contains(bigEndian(4, 4)) else { throw VMTemplateError(.unsupported, "disk image '\(shown)' is qcow2 version \(bigEndian(4, 4)); versions 2 and 3 are supported.") }
                guard bigEndian(8, 8) == 0 else {
                    throw VMTemplateError(.unsupported, "qcow2 image '\(shown)' has a backing file of its own, which vmtemplate does not follow (its name is the image author's to choose): flatten it with 'qemu-img convert -O qcow2 IN OUT' and use that.")
                }
                guard bigEndian(32, 4) == 0 else {
                    throw VMTemplateError(.unsupported, "qcow2 image '\(shown)' is encrypted: vmtemplate attaches unencrypted images only.")
                }
                if bigEndian(4, 4) == 3 {
                    // Incompatible features: 0 dirty, 3 compression type, 4 extended L2 are
                    // QEMU's to handle; 1 (corrupt), 2 (an external data file, opened by a name
                    // the image's author chose) and any unknown bit are refused.
                    let incompatible = bigEndian(72, 8)
                    guard incompatible & ~UInt64(0b11001) == 0 else {
                        let reason = incompatible & 0b10 != 0 ? "is marked corrupt" : incompatible & 0b100 != 0 ? "keeps its data in an external file, which vmtemplate does not follow" : "uses features vmtemplate does not know (incompatible feature bits \(String(incompatible, radix: 2)))"
                        throw VMTemplateError(.unsupported, "qcow2 image '\(shown)' \(reason): convert it to a plain image (qemu-img convert -O qcow2 IN OUT).")
                    }
                }
                size = bigEndian(24, 8)
            }
            guard size > 0, size <= maxSizeBytes else {
                throw VMTemplateError(.invalidArgument, "disk image '\(shown)' is \(size) bytes: a disk must be more than 0 bytes and at most 64 TiB.")
            }
            return DiskImage(descriptor: descriptor, path: path, format: format, virtualSizeBytes: size, writable: writable)
        } catch {
            close(descriptor)
            throw error
        }
    }

    /// `qemu-img` next to the QEMU binary (a checked one), else Debian's: never from `$PATH`,
    /// which is the caller's to set, while this may run as root.
    public static func qemuImg(besides qemu: String) throws -> String {
        let candidates = ["\(FileSystem.split(qemu).directory)/qemu-img", "/usr/bin/qemu-img"]
        guard let found = candidates.first(where: { access($0, X_OK) == 0 }) else {
            throw VMTemplateError(.notFound, "qemu-img is not installed next to \(TerminalText.escape(qemu)) or in /usr/bin (it makes the clone's disk overlays): run scripts/setup, which installs qemu-utils.")
        }
        return found
    }

    /// Creates an empty qcow2 overlay at `overlayPath` whose backing file is this image, and
    /// returns it open read-write. The file is made here first, mode 0600 and exclusively (no
    /// moment in which others could open it, nothing existing is ever truncated); qemu-img then
    /// writes into it. `-u` with the size given: qemu-img does not open the base at all (it was
    /// opened and checked here), so it cannot follow anything the base says.
    public func createOverlay(at overlayPath: String, qemuImg: String) throws -> Int32 {
        let shown = TerminalText.escape(overlayPath)
        let overlay = Glibc.open(overlayPath, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard overlay >= 0 else {
            throw VMTemplateError(errno == EEXIST ? .exists : .ioError, "cannot create the overlay '\(shown)': \(errnoText()).", cause: SystemCallError("open"))
        }
        do {
            let result = try ShortCommand.run(qemuImg, [
                "create", "-q", "-f", "qcow2", "-u", "-b", path, "-F", format.rawValue, overlayPath, String(virtualSizeBytes),
            ])
            guard result.status == 0 else {
                throw VMTemplateError(.ioError, "qemu-img could not create the overlay '\(shown)' on '\(TerminalText.escape(path))'.", detail: result.stderr)
            }
            return overlay
        } catch {
            close(overlay)
            unlink(overlayPath)
            throw error
        }
    }
}
