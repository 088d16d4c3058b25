import Foundation

/// Runs a short-lived helper command to completion and captures its output.
///
/// For probes only (`--version`, `-machine help`); long-lived QEMU processes go through
/// `QEMUProcess`, which owns its child from spawn to reap.
package enum ShortCommand {
    package struct Output: Sendable {
        package var status: Int32
        package var stdout: String
        package var stderr: String
    }

    package static func run(_ executable: String, _ arguments: [String]) throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let stdout = Pipe()
        let stderr = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = FileHandle.nullDevice
        // Checked here, so that the error says which (Process.run's is an NSError dump).
        var info = stat()
        guard stat(executable, &info) == 0 else {
            throw VMTemplateError(.notFound, "could not run '\(executable)': \(errnoText()); check the path.")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw VMTemplateError(.invalidArgument, "'\(executable)' is not a program (it is \((info.st_mode & S_IFMT) == S_IFDIR ? "a directory" : "not a regular file")): give the path of the executable itself.")
        }
        guard access(executable, X_OK) == 0 else {
            throw VMTemplateError(.permissionDenied, "'\(executable)' is not executable by this user: check its mode.")
        }
        do {
            try process.run()
        } catch {
            throw VMTemplateError(.notFound, "could not run '\(executable)': check that it exists and is executable.")
        }
        // Read before waiting, so the child cannot block on a full pipe. The probes print at most a
        // few lines on stderr, far below a pipe's 64 KiB, so reading stdout first cannot deadlock.
        let out = stdout.fileHandleForReading.readDataToEndOfFile()
        let err = stderr.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Output(
            status: process.terminationStatus,
            stdout: String(decoding: out, as: UTF8.self),
            stderr: String(decoding: err, as: UTF8.self)
        )
    }
}
