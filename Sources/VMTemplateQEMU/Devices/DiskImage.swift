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
package struct DiskImage: Sendable {
    /// Open, close-on-exec; the caller closes it once QEMU has its copy.
    package let descriptor: Int32
    /// Its path, or nil for an image its caller opened (``GivenDescriptor``).
    package let path: String?
    package let format: DiskFormat
    /// The size the guest sees.
    package let virtualSizeBytes: UInt64
    package let writable: Bool

    static let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]  // "QFI\xfb"
    /// The largest disk accepted (qemu-img's own limit for qcow2 is 64 TiB).
    package static let maxSizeBytes: UInt64 = 1 << 46

    /// Opens `path` read-only or read-write and checks that it is a regular file or block device
    /// in the stated format, without a backing file of its own.
    package static func open(path: String, format: DiskFormat, writable: Bool) throws -> DiskImage {
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
        guard descriptor >= 0 else {
            let code = errno
            switch code {
            case EACCES, EPERM, EROFS:
                throw VMTemplateError(.permissionDenied, "disk image '\(shown)' cannot be opened \(writable ? "for writing" : "for reading") by this user (\(errnoText(code))): check its permissions\(writable ? ", or attach it with readonly=on or overlay=on" : "").", cause: SystemCallError("open", code: code))
            case EBUSY, ETXTBSY:
                throw VMTemplateError(.busy, "disk image '\(shown)' is in use (\(errnoText(code))): detach it where it is used, or attach it with overlay=on.", cause: SystemCallError("open", code: code))
            default:
                throw VMTemplateError(.ioError, "disk image '\(shown)' cannot be opened: \(errnoText(code)).", cause: SystemCallError("open", code: code))
            }
        }
        do {
            var info = stat()
            guard fstat(descriptor, &info) == 0 else { throw VMTemplateError(.ioError, "cannot inspect disk image '\(shown)': \(errnoText()).") }
            let kind = info.st_mode & S_IFMT
            guard kind == S_IFREG || kind == S_IFBLK else {
                throw VMTemplateError(.invalidArgument, "disk image '\(shown)' is not a regular file or a block device.")
            }
            let flags = fcntl(descriptor, F_GETFL)
            _ = fcntl(descriptor, F_SETFL, flags & ~O_NONBLOCK)
            return try checked(descriptor, path: path, shown: "disk image '\(shown)'", format: format, writable: writable)
        } catch {
            close(descriptor)
            throw error
        }
    }

    /// The image its caller opened (``GivenDescriptor``), as a copy of its descriptor, checked as
    /// ``open(path:format:writable:)`` checks a path's. Its access mode must be the one QEMU
    /// opens the node with (QEMU's fd sets match on it): read-write to be written, read-only for
    /// `readonly=on` and an overlay's base.
    package static func adopt(_ given: GivenDescriptor, format: DiskFormat, writable: Bool) throws -> DiskImage {
        guard given.kind == .disk else {
            throw VMTemplateError(.invalidArgument, "\(given.label) is a tap, not a disk image.")
        }
        // Its sender keeps it open and may rewrite the header after it was read here: a qcow2
        // header then names an external data file or features QEMU would act on. Raw images
        // have no header QEMU reads.
        guard format == .raw || given.fromOwner else {
            throw VMTemplateError(.invalidArgument, "\(given.label) is given as qcow2 by a caller that is not the store's owner, which is refused: its sender could change the header after vmtemplate checked it. Hand over a raw image (overlay=on gives the clone a qcow2 overlay of its own).")
        }
        guard given.writable == writable else {
            throw VMTemplateError(.invalidArgument, writable
                ? "\(given.label) is open read-only, and the disk would be written: open it O_RDWR, or attach it with readonly=on or overlay=on."
                : "\(given.label) is open read-write, and the disk is read-only or an overlay's base: open it O_RDONLY (QEMU takes a descriptor only in the mode it opens the image in).")
        }
        let descriptor = try given.duplicate()
        do {
            return try checked(descriptor, path: nil, shown: "disk image \(given.label)", format: format, writable: writable)
        } catch {
            close(descriptor)
            throw error
        }
    }

    /// Reads the header of the image open as `descriptor` and checks it is in `format`, without a
    /// backing file of its own; `shown` names it in errors.
    private static func checked(_ descriptor: Int32, path: String?, shown: String, format: DiskFormat, writable: Bool) throws -> DiskImage {
        var header = [UInt8](repeating: 0, count: 512)
        let read = header.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, 512, 0) }
        guard read >= 0 else { throw VMTemplateError(.ioError, "cannot read \(shown): \(errnoText()).") }
        let isQCOW2 = read >= 104 && Array(header[0..<4]) == qcow2Magic
        let size: UInt64
        switch format {
        case .raw:
            if isQCOW2 {
                throw VMTemplateError(.invalidArgument, "\(shown) starts like a qcow2 image but format=raw was given: pass format=qcow2 if it is one.")
            }
            let end = lseek(descriptor, 0, SEEK_END)
            guard end >= 0 else { throw VMTemplateError(.ioError, "cannot find the size of \(shown): \(errnoText()).") }
            size = UInt64(end)
        case .qcow2:
            guard isQCOW2 else { throw VMTemplateError(.invalidArgument, "\(shown) is not a qcow2 image: pass format=raw, or convert it (qemu-img convert -O qcow2).") }
            func bigEndian(_ offset: Int, _ count: Int) -> UInt64 {
                header[offset..<(offset + count)].reduce(0) { $0 << 8 | UInt64($1) }
            }
            guard [2, 3].contains(bigEndian(4, 4)) else { throw VMTemplateError(.unsupported, "\(shown) is qcow2 version \(bigEndian(4, 4)); versions 2 and 3 are supported.") }
            guard bigEndian(8, 8) == 0 else {
                throw VMTemplateError(.unsupported, "\(shown) has a backing file of its own, which vmtemplate does not follow (its name is the image author's to choose): flatten it with 'qemu-img convert -O qcow2 IN OUT' and use that.")
            }
            guard bigEndian(32, 4) == 0 else {
                throw VMTemplateError(.unsupported, "\(shown) is encrypted: vmtemplate attaches unencrypted images only.")
            }
            if bigEndian(4, 4) == 3 {
                // Incompatible features: 0 dirty, 3 compression type, 4 extended L2 are
                // QEMU's to handle; 1 (corrupt), 2 (an external data file, opened by a name
                // the image's author chose) and any unknown bit are refused.
                let incompatible = bigEndian(72, 8)
                guard incompatible & ~UInt64(0b11001) == 0 else {
                    let reason = incompatible & 0b10 != 0 ? "is marked corrupt" : incompatible & 0b100 != 0 ? "keeps its data in an external file, which vmtemplate does not follow" : "uses features vmtemplate does not know (incompatible feature bits \(String(incompatible, radix: 2)))"
                    throw VMTemplateError(.unsupported, "\(shown) \(reason): convert it to a plain image (qemu-img convert -O qcow2 IN OUT).")
                }
            }
            size = bigEndian(24, 8)
        }
        guard size > 0, size <= maxSizeBytes else {
            throw VMTemplateError(.invalidArgument, "\(shown) is \(size) bytes: a disk must be more than 0 bytes and at most 64 TiB.")
        }
        return DiskImage(descriptor: descriptor, path: path, format: format, virtualSizeBytes: size, writable: writable)
    }

    /// Creates an empty qcow2 overlay at `overlayPath` whose backing file is this image, and
    /// returns it open read-write. The file is made exclusively and mode 0600 (no moment in which
    /// others could open it, nothing existing is ever truncated) and written here
    /// (``QCOW2Overlay``): no qemu-img process on the clone's path (it cost ~8 ms of a 2-core
    /// machine's clone), and nothing that reads the base.
    package func createOverlay(at overlayPath: String) throws -> Int32 {
        let shown = TerminalText.escape(overlayPath)
        let bytes = try QCOW2Overlay(sizeBytes: virtualSizeBytes, backingFile: path, backingFormat: format).bytes()
        let overlay = Glibc.open(overlayPath, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard overlay >= 0 else {
            throw VMTemplateError(errno == EEXIST ? .exists : .ioError, "cannot create the overlay '\(shown)': \(errnoText()).", cause: SystemCallError("open"))
        }
        let written = bytes.withUnsafeBytes { pwrite(overlay, $0.baseAddress, $0.count, 0) }
        guard written == bytes.count else {
            let code = errno
            close(overlay)
            unlink(overlayPath)
            throw VMTemplateError(.ioError, "cannot write the overlay '\(shown)': \(errnoText(code)).", cause: SystemCallError("pwrite", code: code))
        }
        return overlay
    }
}

/// An empty qcow2 (version 3) image with a backing file, laid out as `qemu-img create -f qcow2
/// -b FILE -F FORMAT` lays it out with 64 KiB clusters: the header (and its extensions and the
/// backing file's name) in cluster 0, the refcount table in cluster 1, one refcount block in
/// cluster 2, the L1 table (all zeros: nothing allocated, every read goes to the backing file)
/// from cluster 3. `qemu-img check` accepts it (DeviceIntegrationTests).
///
/// An overlay of an image its caller opened (no path) names no backing file at all: QEMU is given
/// the base node explicitly either way, and no name is better than one nobody could open.
package struct QCOW2Overlay: Sendable {
    package let sizeBytes: UInt64
    package let backingFile: String?
    package let backingFormat: DiskFormat

    static let clusterBits: UInt64 = 16
    static let clusterSize: UInt64 = 1 << clusterBits
    /// QEMU's own limit on a backing file name.
    package static let maxBackingFileBytes = 1023

    package init(sizeBytes: UInt64, backingFile: String?, backingFormat: DiskFormat) throws {
        guard (backingFile?.utf8.count ?? 0) <= Self.maxBackingFileBytes else {
            throw VMTemplateError(.invalidArgument, "the path of an overlay's base may be at most \(Self.maxBackingFileBytes) bytes (qcow2's limit): move the image to a shorter path.")
        }
        // Whole sectors, as qemu-img rounds them.
        self.sizeBytes = (sizeBytes + 511) / 512 * 512
        self.backingFile = backingFile
        self.backingFormat = backingFormat
    }

    package func bytes() throws -> [UInt8] {
        let cluster = Self.clusterSize
        // Each L2 table maps cluster/8 clusters; the L1 table has one entry per L2 table.
        let l2Coverage = cluster * (cluster / 8)
        let l1Entries = (sizeBytes + l2Coverage - 1) / l2Coverage
        let l1Clusters = max(1, (l1Entries * 8 + cluster - 1) / cluster)
        let l1Offset = 3 * cluster
        // Clusters in use: header, refcount table, refcount block, the L1 table. 16-bit
        // refcounts, so one block counts 32768 clusters, far more than the 19 of a 64 TiB image.
        let usedClusters = 3 + l1Clusters
        guard usedClusters <= cluster / 2, l1Entries <= UInt64(UInt32.max) else {
            throw VMTemplateError(.invalidArgument, "an overlay of \(sizeBytes) bytes is larger than vmtemplate makes (at most 64 TiB).")
        }
        var header = [UInt8]()
        func put(_ value: UInt64, _ width: Int) {
            for shift in stride(from: (width - 1) * 8, through: 0, by: -8) { header.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
        }
        let backingName = Array((backingFile ?? "").utf8)
        let format = backingFile == nil ? [] : Array(backingFormat.rawValue.utf8)
        let paddedFormat = (format.count + 7) / 8 * 8
        let headerLength: UInt64 = 112
        let backingOffset = backingFile == nil ? 0 : headerLength + 8 + UInt64(paddedFormat) + 8
        put(0x5146_49fb, 4)                      // magic "QFI\xfb"
        put(3, 4)                                // version
        put(backingOffset, 8)                    // backing_file_offset
        put(UInt64(backingName.count), 4)        // backing_file_size
        put(Self.clusterBits, 4)                 // cluster_bits
        put(sizeBytes, 8)                        // size
        put(0, 4)                                // crypt_method
        put(l1Entries, 4)                        // l1_size
        put(l1Offset, 8)                         // l1_table_offset
        put(cluster, 8)                          // refcount_table_offset
        put(1, 4)                                // refcount_table_clusters
        put(0, 4)                                // nb_snapshots
        put(0, 8)                                // snapshots_offset
        put(0, 8)                                // incompatible_features
        put(0, 8)                                // compatible_features
        put(0, 8)                                // autoclear_features
        put(4, 4)                                // refcount_order: 16-bit refcounts
        put(headerLength, 4)                     // header_length
        put(0, 8)                                // compression_type (zlib) and padding
        if !format.isEmpty {
            put(0xe279_2aca, 4)                  // extension: backing file format
            put(UInt64(format.count), 4)
            header += format + [UInt8](repeating: 0, count: paddedFormat - format.count)
        }
        put(0, 8)                                // end of extensions
        header += backingName

        var image = [UInt8](repeating: 0, count: Int(l1Offset + l1Entries * 8))
        image.replaceSubrange(0..<header.count, with: header)
        // Refcount table: its one entry points at the refcount block in cluster 2.
        for (index, byte) in (0..<8).map({ UInt8(truncatingIfNeeded: (2 * cluster) >> UInt64(56 - 8 * $0)) }).enumerated() {
            image[Int(cluster) + index] = byte
        }
        // Refcount block: every cluster in use is referenced once.
        for used in 0..<Int(usedClusters) { image[Int(2 * cluster) + 2 * used + 1] = 1 }
        return image
    }
}
