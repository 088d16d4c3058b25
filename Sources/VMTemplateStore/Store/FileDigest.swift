import VMTemplateOS
import VMTemplateQEMU
import Crypto
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// SHA-256 of files, streamed in large reads so a multi-GiB template never sits in memory.
package enum FileDigest {
    public static func sha256(path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw VMTemplateError(.ioError, "cannot read '\(path)' to digest it: \(errnoText()).")
        }
        defer { close(fd) }
        var hasher = SHA256()
        let chunk = 4 * 1024 * 1024
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            let count = read(fd, buffer.baseAddress, chunk)
            if count < 0 {
                if errno == EINTR { continue }
                throw VMTemplateError(.ioError, "reading '\(path)' failed while digesting it: \(errnoText()).")
            }
            if count == 0 { break }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
        }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }
}

/// The `stat(2)` facts a template's quick check compares.
public struct FileStatus: Sendable, Equatable {
    public var sizeBytes: UInt64
    public var mode: UInt16
    public var inode: UInt64
    public var modifiedNanoseconds: Int64
    public var ownerUID: UInt32
    public var isRegularFile: Bool

    public static func read(path: String, followingLinks: Bool = true) throws -> FileStatus {
        var info = stat()
        guard (followingLinks ? stat(path, &info) : lstat(path, &info)) == 0 else {
            let code: VMTemplateError.Code = errno == ENOENT ? .notFound : .ioError
            throw VMTemplateError(code, "cannot stat '\(path)': \(errnoText()).")
        }
        return FileStatus(
            sizeBytes: UInt64(info.st_size),
            mode: UInt16(info.st_mode & 0o7777),
            inode: UInt64(info.st_ino),
            // Saturating: a modification time past 2262 (any value a file can be given) must not trap.
            modifiedNanoseconds: Int64(info.st_mtim.tv_sec).multipliedReportingOverflow(by: 1_000_000_000).overflow
                ? .max : Int64(info.st_mtim.tv_sec) &* 1_000_000_000 &+ Int64(info.st_mtim.tv_nsec),
            ownerUID: info.st_uid,
            isRegularFile: (info.st_mode & S_IFMT) == S_IFREG
        )
    }
}
