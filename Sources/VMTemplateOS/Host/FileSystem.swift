import CLinuxHost
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// POSIX file helpers for the store: durable writes, up-front allocation, and safe removal.
///
/// Every failure becomes a `VMTemplateError` whose message names the path, what failed and what to do.
package enum FileSystem {
    /// A failed system call: which call and its errno, turned into a `VMTemplateError` at the API edge.
    package typealias CallError = SystemCallError

    // MARK: - Durability

    /// Flushes a file's data and metadata to disk so it survives a crash or power loss.
    public static func fsyncFile(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw error("open", path: path, code: errno, permissionNeeded: "this user needs read permission on the file")
        }
        defer { close(fd) }
        guard fsyncRetryingInterrupts(fd) == 0 else {
            throw error("sync", path: path, code: errno, permissionNeeded: "this user needs read permission on the file")
        }
    }

    /// Flushes a directory so that entries created, renamed or removed in it survive a crash.
    public static func fsyncDirectory(path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            throw error("open directory", path: path, code: errno, permissionNeeded: "this user needs read permission on the directory")
        }
        defer { close(fd) }
        guard fsyncRetryingInterrupts(fd) == 0 else {
            throw error("sync directory", path: path, code: errno, permissionNeeded: "this user needs read permission on the directory")
        }
    }

    /// Replaces `path` with `data` so readers see either the old or the new file, never a partial one.
    ///
    /// Writes a temporary file in the same directory (rename is only atomic within one file system),
    /// syncs it, renames it over `path`, then syncs the directory so the rename itself is durable.
    /// `mode` is applied exactly, regardless of the umask. `durable: false` skips both syncs: the
    /// rename still makes the write atomic, and records that die with the machine anyway (a running
    /// clone's) need not pay for a disk flush on the hot path.
    public static func writeFileAtomically(path: String, data: some Collection<UInt8>, mode: mode_t = 0o644, durable: Bool = true) throws {
        let (directory, name) = split(path)
        let writable = "this user needs write permission on the directory '\(directory)'"
        let temporary = "\(directory)/.\(name).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"

        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw error("create", path: temporary, code: errno, permissionNeeded: writable)
        }
        var fdOpen = true
        var renamed = false
        defer {
            if fdOpen { close(fd) }
            if !renamed { unlink(temporary) }
        }

        guard fchmod(fd, mode) == 0 else {
            throw error("set the mode of", path: temporary, code: errno, permissionNeeded: writable)
        }
        let writeResult: Result<Void, CallError> =
            data.withContiguousStorageIfAvailable { writeAll(fd, UnsafeRawBufferPointer($0)) }
            ?? Array(data).withUnsafeBytes { writeAll(fd, $0) }
        if case .failure(let failure) = writeResult {
            throw error("write", path: temporary, code: failure.code, permissionNeeded: writable)
        }
        guard !durable || fsyncRetryingInterrupts(fd) == 0 else {
            throw error("sync", path: temporary, code: errno, permissionNeeded: writable)
        }
        fdOpen = false
        // close(2) can report deferred write errors (e.g. on NFS); a file that failed here is not durable.
        guard close(fd) == 0 else {
            throw error("write", path: temporary, code: errno, permissionNeeded: writable)
        }
        guard rename(temporary, path) == 0 else {
            throw error("rename '\(temporary)' to", path: path, code: errno, permissionNeeded: writable)
        }
        renamed = true
        if durable { try fsyncDirectory(path: directory) }
    }

    /// Creates a new file of `size` bytes with its blocks reserved, failing if the file exists.
    ///
    /// `posix_fallocate` makes a full disk fail now, with a clear error, rather than later as a SIGBUS
    /// in a process that maps the file. File systems that cannot preallocate get a sparse file instead.
    /// On failure the partly created file is removed.
    public static func allocateFile(path: String, size: UInt64, mode: mode_t = 0o644) throws {
        let (directory, _) = split(path)
        let writable = "this user needs write permission on the directory '\(directory)'"
        guard size <= UInt64(Int64.max) else {
            throw VMTemplateError(.invalidArgument, "cannot allocate '\(path)': \(size) bytes is larger than a file can be; use a smaller size")
        }
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw error("create", path: path, code: errno, permissionNeeded: writable)
        }
        var complete = false
        defer {
            close(fd)
            if !complete { unlink(path) }
        }
        guard fchmod(fd, mode) == 0 else {
            throw error("set the mode of", path: path, code: errno, permissionNeeded: writable)
        }
        if size > 0 {
            var result: Int32
            repeat {
                // posix_fallocate returns the error number instead of setting errno.
                result = posix_fallocate(fd, 0, off_t(size))
            } while result == EINTR
            if result == EOPNOTSUPP || result == ENOTSUP {
                guard ftruncate(fd, off_t(size)) == 0 else {
                    throw error("set the size of", path: path, code: errno, permissionNeeded: writable)
                }
            } else if result != 0 {
                throw error("allocate \(ByteSize(bytes: size)) for", path: path, code: result, permissionNeeded: writable)
            }
        }
        complete = true
    }

    // MARK: - Space, modes, removal

    /// Bytes an unprivileged user can still write on the file system holding `path`.
    public static func availableBytes(onFileSystemOf path: String) throws -> UInt64 {
        var info = statvfs()
        guard statvfs(path, &info) == 0 else {
            throw error("check free space on the file system of", path: path, code: errno, permissionNeeded: "this user needs search permission on its parent directories")
        }
        let (product, overflow) = UInt64(info.f_bavail).multipliedReportingOverflow(by: UInt64(info.f_frsize))
        return overflow ? UInt64.max : product
    }

    /// Copies the open file `source` (from its start) into a new file at `path` (made exclusively,
    /// `mode`): a reflink where the file system shares blocks (FICLONE: instant, no space), else the
    /// data ranges only (SEEK_DATA/SEEK_HOLE and copy_file_range), so holes stay holes. Returns the
    /// bytes copied. On failure the new file is removed.
    @discardableResult
    public static func copySparse(from source: Int32, toNewFile path: String, mode: mode_t) throws -> UInt64 {
        let target = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard target >= 0 else {
            throw error("create", path: path, code: errno, permissionNeeded: "this user needs write permission on the directory '\(split(path).directory)'")
        }
        var succeeded = false
        defer {
            close(target)
            if !succeeded { unlink(path) }
        }
        var info = stat()
        guard fstat(source, &info) == 0 else { throw error("inspect the source of", path: path, code: errno, permissionNeeded: "") }
        let size = Int64(info.st_size)
        // FICLONE = _IOW(0x94, 9, int).
        if ioctl(target, 0x4004_9409, source) == 0 {
            succeeded = true
            return UInt64(size)
        }
        var copied: UInt64 = 0
        var offset: Int64 = 0
        while offset < size {
            let dataStart = clinuxhost_seek_data(source, offset, 1)
            if dataStart == -Int64(ENXIO) { break }  // Only a hole is left.
            guard dataStart >= 0 else {
                throw error("find the data of the source of", path: path, code: Int32(-dataStart), permissionNeeded: "")
            }
            var dataEnd = clinuxhost_seek_data(source, dataStart, 0)
            if dataEnd < 0 { dataEnd = size }
            var inputOffset = dataStart
            var outputOffset = dataStart
            var byHand = false
            while inputOffset < dataEnd {
                var count: Int64
                if byHand {
                    count = try copyByHand(from: source, at: inputOffset, to: target, length: Swift.min(dataEnd - inputOffset, 1 << 20), path: path)
                    outputOffset += count
                    inputOffset += count
                } else {
                    count = clinuxhost_copy_file_range(source, &inputOffset, target, &outputOffset, UInt64(Swift.min(dataEnd - inputOffset, 1 << 30)))
                    // Between file systems (EXDEV before Linux 5.19's own fallback) or where the
                    // file system has no copy_file_range: read and write.
                    if [EXDEV, EOPNOTSUPP, EINVAL, ENOSYS].contains(Int32(clamping: -count)) {
                        byHand = true
                        continue
                    }
                }
                if count == -Int64(EINTR) { continue }
                guard count > 0 else {
                    throw error("copy into", path: path, code: count < 0 ? Int32(-count) : EIO, permissionNeeded: "")
                }
                copied += UInt64(count)
            }
            offset = dataEnd
        }
        guard ftruncate(target, off_t(size)) == 0 else {
            throw error("set the size of", path: path, code: errno, permissionNeeded: "")
        }
        succeeded = true
        return copied
    }

    /// Copies up to `length` bytes at `offset` from `source` to the same offset of `target` with
    /// pread and pwrite; returns how many.
    private static func copyByHand(from source: Int32, at offset: Int64, to target: Int32, length: Int64, path: String) throws -> Int64 {
        var buffer = [UInt8](repeating: 0, count: Int(length))
        let read = buffer.withUnsafeMutableBytes { pread(source, $0.baseAddress, $0.count, off_t(offset)) }
        guard read > 0 else { throw error("read the source of", path: path, code: read < 0 ? errno : EIO, permissionNeeded: "") }
        var written = 0
        while written < read {
            let count = buffer[written...].withUnsafeBytes { pwrite(target, $0.baseAddress, read - written, off_t(offset) + off_t(written)) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { throw error("copy into", path: path, code: count < 0 ? errno : EIO, permissionNeeded: "") }
            written += count
        }
        return Int64(read)
    }

    /// Sets the permission bits of `path` (e.g. 0o444 to make a template file read-only).
    public static func setMode(path: String, mode: mode_t) throws {
        guard chmod(path, mode) == 0 else {
            throw error("set the mode of", path: path, code: errno, permissionNeeded: "only the file's owner or root can change its mode")
        }
    }

    /// Removes `path` and everything under it; a path that is already gone is not an error.
    ///
    /// Everything is removed relative to an open directory (`openat`, `unlinkat`) and nothing is
    /// followed: a symbolic link is removed as a link, and a directory swapped for a link while this
    /// runs is refused, so nothing inside a store can make this delete files elsewhere. It refuses to
    /// descend into another mounted file system. Directories that lack owner write permission
    /// (read-only template directories) are made writable before emptying.
    public static func removeTree(path: String) throws {
        let (directory, name) = split(path)
        guard name != "." && name != ".." && name != "/" else {
            throw VMTemplateError(.invalidArgument, "refusing to remove '\(path)': not a single directory entry")
        }
        let parent = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard parent >= 0 else {
            if errno == ENOENT { return }
            throw error("open directory", path: directory, code: errno, permissionNeeded: "this user needs search permission on its parent directories")
        }
        defer { close(parent) }
        try removeEntry(name, in: parent, path: path, device: nil)
    }

    private static func removeEntry(_ name: String, in parent: Int32, path: String, device: dev_t?) throws {
        let parentWritable = "this user needs write permission on the directory '\(split(path).directory)'"
        var info = stat()
        guard fstatat(parent, name, &info, AT_SYMLINK_NOFOLLOW) == 0 else {
            if errno == ENOENT { return }
            throw error("inspect", path: path, code: errno, permissionNeeded: "this user needs search permission on its parent directories")
        }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            guard unlinkat(parent, name, 0) == 0 || errno == ENOENT else {
                throw error("remove", path: path, code: errno, permissionNeeded: parentWritable)
            }
            return
        }
        if let device, info.st_dev != device {
            throw VMTemplateError(.invalidState, "refusing to remove '\(path)': another file system is mounted there; unmount it, then try again")
        }
        let fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return }
            throw error("open directory", path: path, code: errno, permissionNeeded: "this user needs read permission on the directory")
        }
        defer { close(fd) }
        var opened = stat()
        guard fstat(fd, &opened) == 0, opened.st_dev == info.st_dev, opened.st_ino == info.st_ino else {
            throw VMTemplateError(.invalidState, "refusing to remove '\(path)': it changed while being removed; try again")
        }
        if info.st_mode & S_IRWXU != S_IRWXU {
            // Best effort: if this fails, the removals below report the real permission problem.
            _ = fchmod(fd, (info.st_mode & 0o7777) | S_IRWXU)
        }
        let names: [String]
        switch listDirectory(descriptor: fd) {
        case .success(let list):
            names = list
        case .failure(let failure):
            throw error("list", path: path, code: failure.code, permissionNeeded: "this user needs read permission on the directory")
        }
        for child in names {
            try removeEntry(child, in: fd, path: path.hasSuffix("/") ? path + child : path + "/" + child, device: device ?? info.st_dev)
        }
        guard unlinkat(parent, name, AT_REMOVEDIR) == 0 || errno == ENOENT else {
            throw error("remove directory", path: path, code: errno, permissionNeeded: parentWritable)
        }
    }

    /// The canonical path of `path` (symbolic links resolved), or nil when it does not exist.
    public static func resolvedPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Refuses a directory to put a file in that somebody else could change under this process:
    /// it must be a directory (not a link to one) owned by root or this user, and not writable by
    /// group or others, unless it is sticky and this user's (then nobody else may replace or
    /// remove what this user puts there). Every directory above it must hold too (whoever may
    /// rename one swaps the whole path), except that a sticky one may be writable by others as
    /// long as the entry below it is root's or this user's. `what` names the option, for the error.
    package static func requireTrustedDirectory(_ directory: String, for what: String) throws {
        try requireTrustedLeaf(directory, for: what)
        try requireTrustedAncestors(of: directory, for: what)
    }

    /// Every directory above `directory`, on the path as given (a link on the way must be root's
    /// or this user's) and on the real path (each directory root's or this user's, and writable
    /// by nobody else unless sticky).
    private static func requireTrustedAncestors(of directory: String, for what: String) throws {
        let me = geteuid()
        func refuse(_ path: String, _ reason: String) -> VMTemplateError {
            VMTemplateError(.permissionDenied, "'\(TerminalText.escape(path))', on the way to \(what), \(reason): others could swap the path; put \(what) under directories only root or this user may change.")
        }
        let absolute = directory.hasPrefix("/") ? directory : "\(FileManager.default.currentDirectoryPath)/\(directory)"
        var prefix = ""
        for component in absolute.split(separator: "/") {
            prefix += "/\(component)"
            var info = stat()
            guard lstat(prefix, &info) == 0 else { break }
            if (info.st_mode & S_IFMT) == S_IFLNK, info.st_uid != 0, info.st_uid != me {
                throw refuse(prefix, "is a link made by uid \(info.st_uid)")
            }
        }
        guard let real = resolvedPath(directory) else { return }
        var current = real
        while current != "/" {
            let parent = split(current).directory
            var info = stat()
            guard lstat(parent, &info) == 0 else { throw refuse(parent, "cannot be inspected (\(errnoText()))") }
            guard info.st_uid == 0 || info.st_uid == me else { throw refuse(parent, "belongs to uid \(info.st_uid)") }
            if info.st_mode & 0o022 != 0 && info.st_mode & S_ISVTX == 0 {
                throw refuse(parent, "may be changed by \(info.st_mode & 0o002 != 0 ? "everyone" : "its group") (mode \(String(info.st_mode & 0o7777, radix: 8)))")
            }
            current = parent
        }
    }

    private static func requireTrustedLeaf(_ directory: String, for what: String) throws {
        var info = stat()
        guard lstat(directory, &info) == 0 else {
            throw VMTemplateError(.notFound, "the directory '\(TerminalText.escape(directory))' of \(what) does not exist: create it, or pass another \(what).")
        }
        let me = geteuid()
        // A link (such as /var/run -> /run) is followed only when root or this user made it.
        if (info.st_mode & S_IFMT) == S_IFLNK {
            guard info.st_uid == 0 || info.st_uid == me, stat(directory, &info) == 0 else {
                throw VMTemplateError(.permissionDenied, "'\(TerminalText.escape(directory))' is a link somebody else made: put \(what) in a directory only root or this user may change.")
            }
        }
        guard (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == 0 || info.st_uid == me,
              info.st_mode & 0o022 == 0 || (info.st_mode & S_ISVTX != 0 && info.st_uid == me) else {
            throw VMTemplateError(.permissionDenied, "'\(TerminalText.escape(directory))' is not a directory only root or this user may change: put \(what) in one that is.")
        }
    }

    // MARK: - Internals shared by the host readers

    /// Reads a whole file with plain read(2) calls, which /proc files need because they report size 0.
    /// More than `limit` bytes fails with E2BIG.
    package static func readContents(path: String, limit: Int = .max) -> Result<[UInt8], CallError> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(CallError("open", code: errno)) }
        defer { close(fd) }
        return readAll(descriptor: fd, limit: limit)
    }

    /// Reads an open file to its end; more than `limit` bytes fails with E2BIG.
    package static func readAll(descriptor fd: Int32, limit: Int = .max) -> Result<[UInt8], CallError> {
        var contents: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                let code = errno
                if code == EINTR { continue }
                return .failure(CallError("read", code: code))
            }
            if count == 0 { break }
            guard contents.count + count <= limit else { return .failure(CallError("read", code: E2BIG)) }
            contents.append(contentsOf: chunk[0..<count])
        }
        return .success(contents)
    }

    /// `readContents` decoded as UTF-8 (invalid bytes are replaced, which parsers tolerate).
    package static func readText(path: String) -> Result<String, CallError> {
        readContents(path: path).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Builds the error for a failed call on `path`: a sentence saying what failed and what to do.
    package static func error(_ action: String, path: String, code: Int32, permissionNeeded: String) -> VMTemplateError {
        let problem: String
        switch code {
        case ENOSPC, EDQUOT:
            problem = "the file system is full; free space on it or use another store"
        case EACCES, EPERM:
            problem = "permission denied; \(permissionNeeded)"
        case ENOENT:
            problem = "it does not exist; check the path"
        case EEXIST:
            problem = "it already exists; remove it or choose another name"
        case EROFS:
            problem = "the file system is read-only; remount it read-write or use another store"
        case ENOTDIR:
            problem = "part of the path is not a directory; check the path"
        case EIO:
            problem = "the disk reported an I/O error; check the device (see dmesg)"
        default:
            problem = "\(errnoText(code)); check the path and the file system"
        }
        let errorCode: VMTemplateError.Code = code == EEXIST ? .exists : .ioError
        return VMTemplateError(errorCode, "could not \(action) '\(path)': \(problem)", cause: SystemCallError(action, code: code))
    }

    /// Splits a path into its directory ("." when there is none) and last component.
    package static func split(_ path: String) -> (directory: String, name: String) {
        var trimmed = Substring(path)
        while trimmed.count > 1, trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        guard let slash = trimmed.lastIndex(of: "/") else { return (".", String(trimmed)) }
        let directory = trimmed[..<slash]
        let name = trimmed[trimmed.index(after: slash)...]
        return (directory.isEmpty ? "/" : String(directory), String(name))
    }

    private static func fsyncRetryingInterrupts(_ fd: Int32) -> Int32 {
        var result: Int32
        repeat { result = fsync(fd) } while result != 0 && errno == EINTR
        return result
    }

    /// Fills `buffer` from `fd` at `offset` with pread(2) calls (EINTR retried); returns how many
    /// bytes it read, fewer than the buffer holds only where the file ends.
    package static func readFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Result<Int, CallError> {
        var done = 0
        while done < buffer.count, let base = buffer.baseAddress {
            let count = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if count < 0 {
                let code = errno
                if code == EINTR { continue }
                return .failure(CallError("pread", code: code))
            }
            if count == 0 { break }
            done += count
        }
        return .success(done)
    }

    /// Writes all of `buffer` to `fd` (EINTR retried).
    package static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) -> Result<Void, CallError> {
        var offset = 0
        while offset < buffer.count {
            guard let base = buffer.baseAddress else { break }
            let written = write(fd, base + offset, buffer.count - offset)
            if written < 0 {
                let code = errno
                if code == EINTR { continue }
                return .failure(CallError("write", code: code))
            }
            offset += written
        }
        return .success(())
    }

    /// The names in the open directory `descriptor` (which stays open; `fdopendir` gets a copy).
    private static func listDirectory(descriptor: Int32) -> Result<[String], CallError> {
        let copy = dup(descriptor)
        guard copy >= 0 else { return .failure(CallError("dup", code: errno)) }
        guard let directory = fdopendir(copy) else {
            let code = errno
            close(copy)
            return .failure(CallError("fdopendir", code: code))
        }
        defer { closedir(directory) }
        var names: [String] = []
        while true {
            errno = 0
            guard let entry = readdir(directory) else {
                let code = errno
                if code != 0 { return .failure(CallError("readdir", code: code)) }
                break
            }
            let name = withUnsafePointer(to: &entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: MemoryLayout.size(ofValue: entry.pointee.d_name)) {
                    String(cString: $0)
                }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return .success(names)
    }
}

/// An advisory lock on a lock file, using flock(2), shared between processes.
///
/// flock locks belong to the open file description, so two `FileLock` instances (even in one process)
/// exclude each other, while one instance is not reentrant: locking it again while held converts the
/// lock instead of waiting. That is also why this class is deliberately not `Sendable`: tasks that need
/// to exclude each other must each create their own `FileLock` on the same path.
/// The descriptor is O_CLOEXEC so QEMU processes spawned while a lock is held never inherit (and keep) it.
public final class FileLock {
    /// The lock file's path.
    public let path: String
    let fileDescriptor: Int32

    /// Opens (creating with `mode` if needed) the lock file at `path`. A symbolic link is refused:
    /// a lock file is never somebody else's file reached through a link.
    public init(path: String, mode: mode_t = 0o644) throws {
        var fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, mode)
        if fd < 0 && (errno == EACCES || errno == EROFS) {
            // flock works on read-only descriptors, so a lock file another user created is still usable.
            fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        }
        guard fd >= 0 else {
            throw FileSystem.error(
                "open the lock file", path: path, code: errno,
                permissionNeeded: "this user needs write permission on the directory '\(FileSystem.split(path).directory)' or read permission on the lock file"
            )
        }
        self.path = path
        self.fileDescriptor = fd
    }

    /// The lock file's owner and mode, from the open descriptor.
    public var status: (ownerUID: uid_t, mode: mode_t) {
        var info = stat()
        _ = fstat(fileDescriptor, &info)
        return (info.st_uid, info.st_mode & 0o7777)
    }

    /// Runs `body` holding the exclusive lock, waiting at most `timeout` for other holders (polling,
    /// so it never blocks forever; the error names the process that holds the lock). The wait
    /// sleeps the task (`Task.sleep`), never a cooperative thread, so a lock held long by another
    /// process cannot stall every task of this one.
    public func withExclusive<T>(waitingAtMost timeout: Duration, isolation: isolated (any Actor)? = #isolation, _ body: () throws -> T) async throws -> T {
        let deadline = ContinuousClock.now + timeout
        var delay = Duration.microseconds(500)
        while !tryLock(LOCK_EX) {
            guard ContinuousClock.now < deadline else {
                let holder = holders().first.map { "process \($0.pid) (\($0.command))" } ?? "another process"
                throw VMTemplateError(.busy, "the lock '\(path)' has been held by \(holder) for more than \(timeout.shortText): wait for it to finish, or stop it if it hangs.")
            }
            try await Task.sleep(for: delay)
            delay = min(delay * 2, .milliseconds(50))
        }
        defer { unlock() }
        return try body()
    }

    /// The processes holding a lock on this file, from `/proc/locks` (matched by device and inode).
    public func holders() -> [(pid: Int32, command: String)] {
        var info = stat()
        guard fstat(fileDescriptor, &info) == 0, case .success(let text) = FileSystem.readText(path: "/proc/locks") else { return [] }
        let major = ((info.st_dev >> 8) & 0xfff) | ((info.st_dev >> 32) & ~0xfff)
        let minor = (info.st_dev & 0xff) | ((info.st_dev >> 12) & ~0xff)
        let wanted = String(format: "%02x:%02x:%lu", UInt64(major), UInt64(minor), UInt64(info.st_ino))
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; blocked waiters carry "->".
            guard fields.count >= 6, !fields.contains("->"), fields[5] == wanted, let pid = Int32(fields[4]) else { return nil }
            let command = ProcessStat.read(pid: pid)?.comm ?? "gone"
            return (pid, command)
        }
    }

    deinit {
        close(fileDescriptor)
    }

    /// Runs `body` holding the exclusive lock, waiting (blocking the thread) for other holders.
    ///
    /// Unavailable from async code, where blocking a cooperative thread can deadlock the holder.
    @available(*, noasync, message: "blocks the thread; call it with await to use the polling variant")
    public func withExclusive<T>(_ body: () throws -> T) throws -> T {
        try lockBlocking(LOCK_EX)
        defer { unlock() }
        return try body()
    }

    /// Runs `body` holding a shared lock, waiting (blocking the thread) for an exclusive holder.
    ///
    /// Unavailable from async code, where blocking a cooperative thread can deadlock the holder.
    @available(*, noasync, message: "blocks the thread; call it with await to use the polling variant")
    public func withShared<T>(_ body: () throws -> T) throws -> T {
        try lockBlocking(LOCK_SH)
        defer { unlock() }
        return try body()
    }

    /// Runs `body` holding the exclusive lock, polling so no cooperative thread blocks while waiting.
    ///
    /// Throws `CancellationError` if the task is cancelled while waiting.
    public func withExclusive<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> T
    ) async throws -> T {
        try await lockPolling(LOCK_EX)
        defer { unlock() }
        return try await body()
    }

    /// The async variant for a synchronous `body`; without it, async callers would get the blocking one.
    public func withExclusive<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () throws -> T
    ) async throws -> T {
        try await lockPolling(LOCK_EX)
        defer { unlock() }
        return try body()
    }

    /// Runs `body` holding a shared lock, polling so no cooperative thread blocks while waiting.
    ///
    /// Throws `CancellationError` if the task is cancelled while waiting.
    public func withShared<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> T
    ) async throws -> T {
        try await lockPolling(LOCK_SH)
        defer { unlock() }
        return try await body()
    }

    /// The async variant for a synchronous `body`; without it, async callers would get the blocking one.
    public func withShared<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () throws -> T
    ) async throws -> T {
        try await lockPolling(LOCK_SH)
        defer { unlock() }
        return try body()
    }

    /// Takes the exclusive lock if nobody else holds the file; call `unlock()` when done.
    public func tryExclusive() -> Bool {
        tryLock(LOCK_EX)
    }

    /// Takes a shared lock unless someone holds it exclusively; call `unlock()` when done.
    public func tryShared() -> Bool {
        tryLock(LOCK_SH)
    }

    /// Releases the lock taken by `tryExclusive()` or `tryShared()`.
    public func unlock() {
        var result: Int32
        repeat { result = flock(fileDescriptor, LOCK_UN) } while result != 0 && errno == EINTR
    }

    private func tryLock(_ operation: Int32) -> Bool {
        var result: Int32
        repeat { result = flock(fileDescriptor, operation | LOCK_NB) } while result != 0 && errno == EINTR
        return result == 0
    }

    private func lockBlocking(_ operation: Int32) throws {
        var result: Int32
        repeat { result = flock(fileDescriptor, operation) } while result != 0 && errno == EINTR
        guard result == 0 else { throw lockError(errno) }
    }

    private func lockPolling(_ operation: Int32, isolation: isolated (any Actor)? = #isolation) async throws {
        var delay: UInt64 = 1_000_000  // 1 ms, doubling to 100 ms: quick when contention is brief.
        while true {
            let result = flock(fileDescriptor, operation | LOCK_NB)
            if result == 0 { return }
            let code = errno
            guard code == EWOULDBLOCK || code == EINTR else { throw lockError(code) }
            try await Task.sleep(nanoseconds: delay)
            delay = min(delay * 2, 100_000_000)
        }
    }

    private func lockError(_ code: Int32) -> VMTemplateError {
        VMTemplateError(
            .ioError,
            "could not lock '\(path)': \(errnoText(code)); put the store on a local file system that supports flock",
            cause: SystemCallError("flock", code: code)
        )
    }
}
