import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

/// Bad input to `create`: one clear line on stderr, exit status 1, nothing left in the store.
@Suite("create refuses bad input", .enabled(if: Environment.canRunGuests, "needs QEMU and the busybox guest: run scripts/setup"))
struct CreateBadInputTests {
    /// Runs `create` in a fresh store and checks that it failed cleanly.
    func expectRefused(_ arguments: [String], name: String = "t", saying expected: String, environment: [String: String] = [:]) throws {
        let store = try TemporaryStore("bad")
        defer { store.remove() }
        let hasRecipe = arguments.contains("--recipe")
        let result = try CLI.run(["create", name] + (hasRecipe ? [] : ["--recipe", Checkout.busyboxRecipe]) + arguments + store.arguments, environment: environment)
        #expect(result.status != 0, "exit status for \(arguments)")
        #expect(result.stderr.hasPrefix("vmtemplate: error: "), "stderr: \(result.stderr)")
        #expect(result.stderr.contains(expected), "stderr: \(result.stderr)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: "\(store.root)/templates")) ?? []).isEmpty)
        #expect(store.stagingEntries().isEmpty)
        #expect(QEMUProcesses.using(store.root).isEmpty)
    }

    @Test("an invalid name is refused before the store is touched", arguments: ["../escape", ".hidden", "a/b", "x y", ""])
    func invalidName(name: String) throws {
        let root = "/tmp/vmt-untouched-\(UUID().uuidString.prefix(8))"
        let result = try CLI.run(["create", name, "--recipe", Checkout.busyboxRecipe, "--store", root])
        #expect(result.status != 0)
        #expect(result.stderr.contains("template name"))
        #expect(!FileManager.default.fileExists(atPath: root), "nothing may be created for an invalid name")
    }

    @Test("sizes that are zero, malformed, or larger than free memory", arguments: [
        ("0", "greater than zero"), ("12Q", "invalid size '12Q'"), ("100T", "more than this machine has free"), ("1.5G", "invalid size"), ("1000", "too small"),
    ])
    func badSizes(size: String, message: String) throws {
        try expectRefused(["--memory", size], saying: message)
    }

    @Test("a missing kernel says to build the guest")
    func missingKernel() throws {
        let recipe = try RecipeFile(changing: ["kernel": "out/no-such-vmlinuz"])
        defer { recipe.remove() }
        try expectRefused(["--recipe", recipe.path], saying: "kernel")
    }

    @Test("a missing recipe names the file")
    func missingRecipe() throws {
        try expectRefused(["--recipe", "/nonexistent/template.json"], saying: "recipe '/nonexistent/template.json' does not exist")
    }

    @Test("a missing QEMU says how to install one")
    func missingQEMU() throws {
        try expectRefused(["--qemu", "/nonexistent/qemu"], saying: "does not exist or is not executable")
        try expectRefused([], saying: "not found on PATH", environment: ["PATH": "/nonexistent", "VMTEMPLATE_QEMU": ""])
    }

    @Test("a QEMU too old for templates is refused with the version it has")
    func oldQEMU() throws {
        let fake = NSTemporaryDirectory() + "qemu-old-\(UUID().uuidString.prefix(8))"
        try Data("#!/bin/sh\necho 'QEMU emulator version 4.0.0 (fake)'\n".utf8).write(to: URL(fileURLWithPath: fake))
        defer { try? FileManager.default.removeItem(atPath: fake) }
        chmod(fake, 0o755)
        try expectRefused(["--qemu", fake], saying: "QEMU 4.0.0")
    }

    @Test("doctor reports in the documented JSON keys")
    func doctorJSON() throws {
        let result = try CLI.run(["doctor", "--json"])
        #expect(result.status == 0)
        let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] ?? [:]
        for key in ["qemu_path", "qemu_version", "supports_rom", "supports_file_migration", "kvm_usable", "default_accel"] {
            #expect(object[key] != nil, "missing \(key)")
        }
        #expect(object["supports_rom"] as? Bool == true)
        #expect(object["default_accel"] as? String == (KVMProbe.probe().usableForStockGuests ? "kvm" : "tcg"))
    }

    @Test("doctor with a missing QEMU exits non-zero and says what to do")
    func doctorMissingQEMU() throws {
        let result = try CLI.run(["doctor", "--qemu", "/nonexistent/qemu"])
        #expect(result.status != 0)
        #expect(result.stdout.contains("problem:"))
    }
}
