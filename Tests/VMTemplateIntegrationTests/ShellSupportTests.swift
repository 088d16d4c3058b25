import Foundation
import Testing

@testable import VMTemplateOS

/// Completion scripts and the systemd unit, checked by the tools that read them.
@Suite("shell support and the systemd unit")
struct ShellSupportTests {
    @Test("completion scripts for bash, zsh and fish name the commands; bash's parses")
    func completions() throws {
        for shell in ["bash", "zsh", "fish"] {
            let result = try CLI.run(["completion", shell])
            #expect(result.status == 0, "\(shell): \(result.stderr)")
            #expect(result.stdout.contains("clone") && result.stdout.contains("serve") && result.stdout.contains("pool"), "\(shell)")
        }
        let bash = try CLI.run(["completion", "bash"])
        let script = NSTemporaryDirectory() + "vmtemplate-completion-\(UUID().uuidString.prefix(8)).bash"
        try Data(bash.stdout.utf8).write(to: URL(fileURLWithPath: script))
        defer { unlink(script) }
        #expect(try ShortCommand.run("/bin/bash", ["-n", script]).status == 0, "bash -n rejects the completion script")
        #expect(try CLI.run(["completion", "tcsh"]).status == 64)
    }

    @Test("the committed man page is the one the argument parser makes now, and groff reads it without a warning")
    func manPage() throws {
        let tool = URL(fileURLWithPath: Checkout.binary).deletingLastPathComponent().appendingPathComponent("generate-manual").path
        try #require(FileManager.default.isExecutableFile(atPath: tool), "no \(tool): run swift build --product generate-manual")
        let fresh = NSTemporaryDirectory() + "vmtemplate-\(UUID().uuidString.prefix(8)).1"
        defer { unlink(fresh) }
        let generated = try ShortCommand.run("/usr/bin/env", ["GENERATE_MANUAL=\(tool)", "\(Checkout.root)/scripts/generate-man", Checkout.binary, fresh])
        try #require(generated.status == 0, "\(generated.stderr)")
        let committed = try String(contentsOfFile: "\(Checkout.root)/dist/man/vmtemplate.1", encoding: .utf8)
        #expect(try String(contentsOfFile: fresh, encoding: .utf8) == committed, "dist/man/vmtemplate.1 is stale: run scripts/generate-man")
        #expect(committed.contains(".It 69") && committed.contains("Sh \"EXIT STATUS\""))
        let lint = try ShortCommand.run("/usr/bin/groff", ["-man", "-ww", "-z", "\(Checkout.root)/dist/man/vmtemplate.1"])
        #expect(lint.status == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty, "groff: \(lint.stderr)")
    }

    @Test("every command's --help has an example")
    func examplesInHelp() throws {
        func subcommands(of path: [String]) throws -> [String] {
            let help = try CLI.run(path + ["--help"]).stdout
            guard let start = help.range(of: "SUBCOMMANDS:\n") else { return [] }
            return help[start.upperBound...].split(separator: "\n").compactMap { line in
                guard line.hasPrefix("  "), !line.hasPrefix("   ") else { return nil }
                return line.split(separator: " ").first.map(String.init)
            }.filter { $0 != "help" }
        }
        var commands = try subcommands(of: []).map { [$0] }
        #expect(commands.count >= 20, "\(commands)")
        for command in commands { commands += try subcommands(of: command).map { command + [$0] } }
        for command in commands {
            let help = try CLI.run(command + ["--help"])
            #expect(help.stdout.contains("Example"), "vmtemplate \(command.joined(separator: " ")) --help has no example")
        }
    }

    @Test("the systemd unit passes systemd-analyze verify", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze"), "needs systemd-analyze"))
    func systemdUnit() throws {
        let unit = try String(contentsOfFile: "\(Checkout.root)/dist/systemd/vmtemplate.service", encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/local/bin/vmtemplate serve") && unit.contains("KillMode=process"))
        // verify checks that ExecStart's binary exists: this checkout's stands in for the installed one.
        let copy = NSTemporaryDirectory() + "vmtemplate-\(UUID().uuidString.prefix(8)).service"
        try Data(unit.replacingOccurrences(of: "/usr/local/bin/vmtemplate", with: Checkout.binary).utf8).write(to: URL(fileURLWithPath: copy))
        defer { unlink(copy) }
        let verified = try ShortCommand.run("/usr/bin/systemd-analyze", ["verify", copy])
        #expect(verified.status == 0 && verified.stderr.isEmpty, "\(verified.stderr)")
    }
}

/// Lints run by tools nobody here wrote: what a packager runs.
@Suite("the unit, the man page and the scripts under their linters")
struct LinterTests {
    @Test("systemd-analyze security rates the unit 3.0 or better", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze"), "needs systemd-analyze"))
    func unitExposure() throws {
        let result = try ShortCommand.run("/usr/bin/systemd-analyze", ["security", "--offline=yes", "--no-pager", "\(Checkout.root)/dist/systemd/vmtemplate.service"])
        let line = result.stdout.split(separator: "\n").first { $0.contains("Overall exposure level") }.map(String.init) ?? ""
        let score = line.split(separator: ":").last.flatMap { Double($0.split(separator: " ").first ?? "") }
        #expect((score ?? 99) <= 3.0, "\(line)\n\(result.stderr)")
    }

    @Test("mandoc -Tlint finds nothing at warning level in the man page", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/mandoc"), "scripts/setup --for-tests installs mandoc"))
    func manPageLint() throws {
        let result = try ShortCommand.run("/usr/bin/mandoc", ["-Tlint", "-Wwarning", "\(Checkout.root)/dist/man/vmtemplate.1"])
        #expect(result.status == 0 && result.stdout.isEmpty && result.stderr.isEmpty, "\(result.stdout)\(result.stderr)")
    }

    @Test("shellcheck finds nothing at warning level in the scripts, the template builds and the busybox guest's init", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/shellcheck"), "scripts/setup --for-tests installs shellcheck"))
    func shellcheck() throws {
        let candidates = try FileManager.default.contentsOfDirectory(atPath: "\(Checkout.root)/scripts").map { "scripts/\($0)" }
            + ["templates/busybox/build", "templates/debian/build", "templates/busybox/init", ".ci/run"]
        let shells = candidates.sorted().filter { path in
            let first = (try? String(contentsOfFile: "\(Checkout.root)/\(path)", encoding: .utf8))?.split(separator: "\n").first ?? ""
            return first.hasPrefix("#!") && (first.hasSuffix("bash") || first.hasSuffix("/sh") || first.hasSuffix("busybox sh"))
        }
        #expect(shells.count >= 8, "\(shells)")
        let result = try ShortCommand.run("/usr/bin/shellcheck", ["-S", "warning"] + shells.map { "\(Checkout.root)/\($0)" })
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }
}
