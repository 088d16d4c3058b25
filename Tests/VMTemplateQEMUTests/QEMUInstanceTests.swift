import Foundation
import Testing

@testable import VMTemplateOS
@testable import VMTemplateQEMU

#if canImport(Glibc)
import Glibc
#endif

@Suite("QEMUInstance: identity before any signal")
struct QEMUIdentityTests {
    private func commandLine(_ arguments: [String]) -> [UInt8] {
        Array(arguments.joined(separator: "\0").utf8) + [0]
    }

    @Test("a command line with -name NAME is that instance's, any other is not")
    func nameOnTheCommandLine() {
        let mine = commandLine(["/usr/bin/qemu-system-x86_64", "-name", "vmtemplate-clone-abc", "-S"])
        #expect(QEMUIdentity.problem(commandLine: mine, name: "vmtemplate-clone-abc") == nil)
        #expect(QEMUIdentity.problem(commandLine: mine, name: "vmtemplate-clone-ab") != nil)
        // The name must be the value of -name, not merely appear somewhere.
        let elsewhere = commandLine(["/usr/bin/qemu-system-x86_64", "-append", "vmtemplate-clone-abc", "-name", "other"])
        #expect(QEMUIdentity.problem(commandLine: elsewhere, name: "vmtemplate-clone-abc") != nil)
        // -name as the last argument has no value.
        #expect(QEMUIdentity.problem(commandLine: commandLine(["qemu", "-name"]), name: "") != nil)
    }

    @Test("a name with a comma is matched as QEMU's option syntax renders it")
    func escapedName() {
        let rendered = QEMUOptionString.render(type: "a,b", [])
        let line = commandLine(["qemu-system-x86_64", "-name", rendered])
        #expect(QEMUIdentity.problem(commandLine: line, name: "a,b") == nil)
    }
}

private let qemuPath = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"]
    .first { FileManager.default.isExecutableFile(atPath: $0) }

@Suite("QEMUInstance on a real QEMU", .timeLimit(.minutes(1)), .enabled(if: qemuPath != nil, "qemu-system-x86_64 is not installed"))
struct QEMUInstanceTests {
    private func withDirectory<T>(_ body: (String) async throws -> T) async throws -> T {
        var template = Array("/tmp/qinst.XXXXXX".utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        return try await body(directory)
    }

    private func launch(in directory: String, name: String = "vmtemplate-test") throws -> QEMUInstance {
        let paths = InstancePaths(directory: directory)
        let arguments = ["-name", name, "-machine", "none", "-nodefaults", "-display", "none", "-S",
                         "-chardev", "socket,id=qmp,fd=\(QMPListener.inheritedDescriptor),server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
        return try QEMUInstance.launch(arguments: arguments, name: name, paths: paths, qmp: .inheritedListener, executable: try #require(qemuPath))
    }

    @Test("attach accepts the instance's own QEMU and refuses a wrong name, a wrong binary, a reused PID, a non-QEMU")
    func attachChecksIdentity() async throws {
        try await withDirectory { directory in
            let qemu = try launch(in: directory)
            defer { _ = try? qemu.kill(); qemu.waitForExitBlocking() }
            let qmp = try await qemu.connectQMP(timeout: .seconds(20))
            qmp.close()
            let paths = InstancePaths(directory: directory)
            func attach(_ identity: ProcessIdentity, name: String = "vmtemplate-test", executable: String? = nil) -> QEMUInstance.Attachment {
                QEMUInstance.attach(identity: identity, name: name, qmpSocket: paths.qmpSocket, logPath: paths.qemuLog, executable: executable)
            }
            guard case .running = attach(qemu.identity, executable: qemuPath) else {
                Issue.record("its own QEMU was not recognised")
                return
            }
            guard case .notThisQEMU = attach(qemu.identity, name: "vmtemplate-clone-other") else {
                Issue.record("a QEMU with another -name was accepted")
                return
            }
            guard case .notThisQEMU = attach(qemu.identity, executable: "/bin/sleep") else {
                Issue.record("a QEMU running another binary than recorded was accepted")
                return
            }
            // The same PID with another start time: the PID was reused, the recorded QEMU is gone.
            guard case .exited = attach(ProcessIdentity(pid: qemu.pid, startTime: qemu.identity.startTime + 1)) else {
                Issue.record("a reused PID was not told apart")
                return
            }
            // This test process is alive but no QEMU: never to be signalled as one.
            let me = try #require(ProcessIdentity.current(pid: getpid()))
            guard case .notThisQEMU = attach(me) else {
                Issue.record("a process that is not QEMU was accepted")
                return
            }
            #expect(qemu.isRunning, "no check may have signalled it")
        }
    }

    @Test("the stop ladder says how QEMU ended: quit, SIGKILL for a stopped one, already exited")
    func stopLadder() async throws {
        try await withDirectory { directory in
            let obedient = try launch(in: directory)
            #expect(try await obedient.stop(grace: .seconds(5)) == .quit)
            #expect(!obedient.isRunning)
            #expect(try await obedient.stop() == .alreadyExited)
        }
        try await withDirectory { directory in
            let frozen = try launch(in: directory)
            let qmp = try await frozen.connectQMP(timeout: .seconds(20))
            qmp.close()
            // SIGSTOP: QMP gets no answer and SIGTERM stays pending; only SIGKILL ends it.
            kill(frozen.pid, SIGSTOP)
            #expect(try await frozen.stop(grace: .milliseconds(300)) == .killed)
            #expect(frozen.exitDescription == "killed by signal 9")
        }
    }

    @Test("a QEMU that dies at start-up fails the QMP connection with its exit status and last words")
    func deathIsDiagnosed() async throws {
        try await withDirectory { directory in
            let paths = InstancePaths(directory: directory)
            let arguments = ["-name", "broken", "-no-such-option",
                             "-chardev", "socket,id=qmp,fd=\(QMPListener.inheritedDescriptor),server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
            let qemu = try QEMUInstance.launch(arguments: arguments, name: "broken", paths: paths, qmp: .inheritedListener, executable: try #require(qemuPath))
            let error = await #expect(throws: VMTemplateError.self) { _ = try await qemu.connectQMP(timeout: .seconds(20)) }
            #expect(error?.code == .qemuFailed)
            #expect(error?.message.contains("QEMU exited with status 1 during start-up") == true, "\(String(describing: error))")
            let exit = try #require(error?.cause as? QEMUExit)
            #expect(exit.lastWords.contains("no-such-option"))
        }
    }

    @Test("add-fd hands QEMU an open file it could not open by path (the path is gone): /dev/fdset/N works")
    func descriptorPassing() async throws {
        try await withDirectory { directory in
            let qemu = try launch(in: directory)
            defer { _ = try? qemu.kill(); qemu.waitForExitBlocking() }
            let qmp = try await qemu.connectQMP(timeout: .seconds(20))
            defer { qmp.close() }
            let path = "\(directory)/disk.raw"
            try Data(repeating: 0x5a, count: 1 << 20).write(to: URL(fileURLWithPath: path))
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0)
            defer { close(fd) }
            unlink(path)
            let (fdset, _) = try await qmp.addFD(fd, opaque: "disk")
            try await qmp.execute("blockdev-add", arguments: JSONValue.object([
                "node-name": .string("passed"), "driver": .string("raw"), "read-only": .bool(true),
                "file": .object(["driver": .string("file"), "filename": .string("/dev/fdset/\(fdset)"), "read-only": .bool(true)]),
            ]))
            let sets = try await qmp.execute("query-fdsets", as: JSONValue.self)
            #expect(sets[0]?["fdset-id"]?.intValue == fdset)
            #expect(sets[0]?["fds"]?[0]?["opaque"]?.stringValue == "disk")
        }
    }
}
