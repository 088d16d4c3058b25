import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

@Suite("vmtemplate explain: share × readonly × rom")
struct MemoryBackendExplanationTests {
    /// One row of the table in docs/memory-backend.md, written out by hand.
    struct Row: Sendable, CustomTestStringConvertible {
        var share: Bool
        var readonly: Bool
        var rom: OnOffAuto
        var valid: Bool
        var openMode: FileOpenMode?
        var mapping: FileMapping?
        var resolvedROM: Bool

        var testDescription: String {
            "share=\(share ? "on" : "off"),readonly=\(readonly ? "on" : "off"),rom=\(rom.rawValue)"
        }
    }

    static let table: [Row] = [
        Row(share: false, readonly: false, rom: .off, valid: true, openMode: .readWrite, mapping: .private, resolvedROM: false),
        Row(share: false, readonly: false, rom: .auto, valid: true, openMode: .readWrite, mapping: .private, resolvedROM: false),
        Row(share: false, readonly: false, rom: .on, valid: false, openMode: nil, mapping: nil, resolvedROM: true),
        Row(share: false, readonly: true, rom: .off, valid: true, openMode: .readOnly, mapping: .private, resolvedROM: false),
        Row(share: false, readonly: true, rom: .auto, valid: true, openMode: .readOnly, mapping: .private, resolvedROM: true),
        Row(share: false, readonly: true, rom: .on, valid: true, openMode: .readOnly, mapping: .private, resolvedROM: true),
        Row(share: true, readonly: false, rom: .off, valid: true, openMode: .readWrite, mapping: .shared, resolvedROM: false),
        Row(share: true, readonly: false, rom: .auto, valid: true, openMode: .readWrite, mapping: .shared, resolvedROM: false),
        Row(share: true, readonly: false, rom: .on, valid: false, openMode: nil, mapping: nil, resolvedROM: true),
        Row(share: true, readonly: true, rom: .off, valid: false, openMode: nil, mapping: nil, resolvedROM: false),
        Row(share: true, readonly: true, rom: .auto, valid: true, openMode: .readOnly, mapping: .shared, resolvedROM: true),
        Row(share: true, readonly: true, rom: .on, valid: true, openMode: .readOnly, mapping: .shared, resolvedROM: true),
    ]

    static let romOnError = "property 'rom' = 'on' is not supported with 'readonly' = 'off'"
    static let romOffError = "property 'rom' = 'off' is incompatible with 'readonly' = 'on' and 'share' = 'on'"

    @Test("the table covers each of the 12 combinations once")
    func tableIsComplete() {
        #expect(Set(Self.table.map(\.testDescription)).count == 12)
    }

    @Test("each combination explains as the table says", arguments: table)
    func combination(row: Row) throws {
        let text = row.testDescription
        let options = try MemoryBackendOptions(parsing: text)
        let explanation = MemoryBackendExplanation.explain(options)
        #expect(explanation.share == row.share)
        #expect(explanation.readonly == row.readonly)
        #expect(explanation.rom == row.rom)
        #expect(explanation.valid == row.valid)
        #expect(explanation.openMode == row.openMode)
        #expect(explanation.mapping == row.mapping)
        #expect(explanation.resolvedROM == row.resolvedROM)
        #expect((explanation.guestMemory != nil) == row.valid)
        #expect((explanation.typicalUse != nil) == row.valid)
        #expect(explanation.file == nil)
        if row.valid {
            #expect(explanation.error == nil)
            #expect(explanation.lines.first == "QEMU accepts \(text)")
        } else {
            let expected = row.rom == .on ? Self.romOnError : Self.romOffError
            #expect(explanation.error == expected)
            #expect(explanation.lines.first == "QEMU refuses \(text): \(expected)")
            #expect(explanation.hint != nil, "a refusal says what to use instead")
        }
    }

    @Test("what the guest sees follows the mapping and the resolved rom")
    func guestMemory() throws {
        let clone = MemoryBackendExplanation.explain(.clone)
        #expect(clone.guestMemory == "RAM; writes are private copy-on-write pages, never reach the file")
        #expect(clone.hint == nil)
        #expect(clone.typicalUse?.contains("clone") == true)
        let template = MemoryBackendExplanation.explain(.template)
        #expect(template.guestMemory == "RAM; writes reach the file and every process that maps it")
        #expect(template.typicalUse?.contains("template VM") == true)
        #expect(template.hint?.contains("change the file itself") == true)
        let nvdimm = MemoryBackendExplanation.explain(try MemoryBackendOptions(parsing: "share=on,readonly=on"))
        #expect(nvdimm.guestMemory?.hasPrefix("ROM;") == true)
        #expect(nvdimm.typicalUse?.contains("NVDIMM") == true)
    }

    // MARK: Parsing

    @Test("absent keys take QEMU's defaults and are recorded as not given")
    func defaults() throws {
        let parsed = try MemoryBackendOptions.parse("readonly=on")
        #expect(parsed.options == MemoryBackendOptions(share: false, readonly: true, rom: nil))
        #expect(parsed.given == [.readonly])
        #expect(parsed.defaulted == [.share, .rom])
        let explanation = MemoryBackendExplanation.explain(parsed.options)
        #expect(explanation.rom == .auto)
        #expect(explanation.resolvedROM)
        #expect(explanation.lines(defaulted: parsed.defaulted).contains("  defaults:    share=off, rom=auto (not given)"))

        let onlyShare = try MemoryBackendOptions.parse("share=on")
        #expect(onlyShare.options == MemoryBackendOptions(share: true, readonly: false, rom: nil))
        #expect(onlyShare.defaulted == [.readonly, .rom])

        let all = try MemoryBackendOptions.parse("rom=auto,readonly=off,share=off")
        #expect(all.options == MemoryBackendOptions(share: false, readonly: false, rom: .auto))
        #expect(all.defaulted.isEmpty)
        #expect(try MemoryBackendOptions(parsing: "share=off,readonly=on,rom=off") == .clone)
    }

    @Test("booleans are spelled as QEMU spells them", arguments: [
        ("on", true), ("yes", true), ("true", true), ("y", true),
        ("off", false), ("no", false), ("false", false), ("n", false),
    ])
    func booleanSpellings(text: String, value: Bool) throws {
        let options = try MemoryBackendOptions(parsing: "share=\(text),readonly=\(text)")
        #expect(options.share == value)
        #expect(options.readonly == value)
    }

    @Test("malformed strings are invalidArgument errors that say what to do", arguments: [
        ("share=maybe", ["share=maybe", "on or off"]),
        ("rom=yes", ["rom=yes", "on, off or auto"]),
        ("readonly=", ["readonly=", "on or off"]),
        ("share=ON", ["share=ON", "on or off"]),
        ("size=1G", ["'size'", "share, readonly and rom"]),
        ("share=on,mem-path=/x", ["'mem-path'", "share, readonly and rom"]),
        ("=on", ["no property name", "share, readonly and rom"]),
        ("share=on,share=off", ["'share' is given twice", "share=on and share=off", "once"]),
        ("", ["no memory-backend-file options", "e.g. share=off,readonly=on,rom=off"]),
        ("   ", ["no memory-backend-file options"]),
        ("share", ["'share' has no '='", "key=value"]),
        ("share=on,readonly", ["'readonly' has no '='"]),
        ("memory-backend-file,share=on", ["without 'memory-backend-file,'"]),
        ("share=on,", ["empty item"]),
        ("share=on,,readonly=on", ["empty item"]),
    ])
    func parseErrors(text: String, fragments: [String]) {
        do {
            _ = try MemoryBackendOptions(parsing: text)
            Issue.record("'\(text)' parsed")
        } catch let error as VMTemplateError {
            #expect(error.code == .invalidArgument)
            for fragment in fragments {
                #expect(error.message.contains(fragment), "\(error.message)")
            }
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    // MARK: JSON

    @Test("JSON has exactly the documented keys, null where nothing applies")
    func jsonKeys() throws {
        let refused = MemoryBackendExplanation.explain(MemoryBackendOptions(share: true, readonly: true, rom: .off))
        let object = try jsonObject(refused)
        #expect(Set(object.keys) == ["share", "readonly", "rom", "resolved_rom", "valid", "error", "open_mode", "mapping", "guest_sees", "writes_reach_file", "explanation", "typical_use", "hint", "file"])
        #expect(object["share"] as? String == "on" && object["readonly"] as? String == "on" && object["resolved_rom"] as? String == "off")
        #expect(object["valid"] as? Bool == false)
        #expect(object["error"] as? String == Self.romOffError)
        #expect(object["rom"] as? String == "off")
        for key in ["open_mode", "mapping", "guest_sees", "writes_reach_file", "explanation", "typical_use", "file"] {
            #expect(object[key] is NSNull, "\(key)")
        }

        let clone = MemoryBackendExplanation.explain(.clone, file: "/nonexistent/memory", access: { _, _ in ENOENT })
        let cloneObject = try jsonObject(clone)
        #expect(cloneObject["open_mode"] as? String == "read-only")
        #expect(cloneObject["mapping"] as? String == "private")
        #expect(cloneObject["resolved_rom"] as? String == "off")
        #expect(cloneObject["guest_sees"] as? String == "ram")
        #expect(cloneObject["writes_reach_file"] as? Bool == false)
        #expect(cloneObject["share"] as? String == "off")
        #expect(cloneObject["error"] is NSNull)
        let file = try #require(cloneObject["file"] as? [String: Any])
        #expect(Set(file.keys) == ["path", "exists", "readable", "writable", "would_open"])
        #expect(file["exists"] as? Bool == false)
        #expect(file["would_open"] as? Bool == false)

        let template = try jsonObject(MemoryBackendExplanation.explain(.template))
        #expect(template["open_mode"] as? String == "read-write")
        #expect(template["mapping"] as? String == "shared")
        #expect(template["rom"] as? String == "auto")
        #expect(template["writes_reach_file"] as? Bool == true)
        #expect(try jsonObject(MemoryBackendExplanation.explain(MemoryBackendOptions(share: false, readonly: true, rom: .on)))["guest_sees"] as? String == "rom")
    }

    @Test("JSON decodes back to the same explanation")
    func jsonRoundTrip() throws {
        let explanation = MemoryBackendExplanation.explain(.writableClone, file: "/t/memory", access: { _, readWrite in readWrite ? EACCES : 0 })
        let data = try JSONCoding.encode(explanation)
        #expect(try JSONCoding.decoder().decode(MemoryBackendExplanation.self, from: data) == explanation)
    }

    private func jsonObject(_ explanation: MemoryBackendExplanation) throws -> [String: Any] {
        let data = Data(try JSONCoding.line(explanation).utf8)
        return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    // MARK: The hint, through an injected file check

    @Test("private + read-write + EACCES/EPERM/EROFS on O_RDWR + O_RDONLY works: QEMU 8.2's hint", arguments: [EACCES, EPERM, EROFS])
    func readOnlyFileHint(code: Int32) {
        for rom in [nil, OnOffAuto.auto, .off] {
            let options = MemoryBackendOptions(share: false, readonly: false, rom: rom)
            let explanation = MemoryBackendExplanation.explain(options, file: "/t/memory", access: { _, readWrite in readWrite ? code : 0 })
            #expect(explanation.hint == MemoryBackendExplanation.readOnlyFileHint)
            #expect(explanation.hint == "the file cannot be opened read-write; a private mapping does not need that: use readonly=on,rom=off (QEMU >= 8.2)")
            #expect(explanation.file == MemoryBackendExplanation.FileCheck(path: "/t/memory", exists: true, readable: true, writable: false, wouldOpen: false))
            #expect(explanation.lines.last == "  file:        /t/memory: readable, not writable by this user; QEMU could not open it read-write")
        }
    }

    @Test("no QEMU 8.2 hint when any part of the rule does not hold")
    func noReadOnlyFileHint() {
        let denied: (String, Bool) -> Int32 = { _, readWrite in readWrite ? EACCES : 0 }
        // Shared: a read-only file cannot back shared writable RAM, so readonly=on,rom=off would not help.
        let shared = MemoryBackendExplanation.explain(.template, file: "/t/memory", access: denied)
        #expect(shared.hint != MemoryBackendExplanation.readOnlyFileHint)
        #expect(shared.hint?.contains("could not open /t/memory read-write (Permission denied)") == true)
        // Already read-only: the file opens, nothing to fix.
        let clone = MemoryBackendExplanation.explain(.clone, file: "/t/memory", access: denied)
        #expect(clone.hint == nil)
        #expect(clone.file?.wouldOpen == true)
        // Not even readable: readonly=on would not open it either.
        let unreadable = MemoryBackendExplanation.explain(.writableClone, file: "/t/memory", access: { _, _ in EACCES })
        #expect(unreadable.hint != MemoryBackendExplanation.readOnlyFileHint)
        #expect(unreadable.file?.readable == false)
        // Some other failure (e.g. ETXTBSY) is not a permission problem.
        let busy = MemoryBackendExplanation.explain(.writableClone, file: "/t/memory", access: { _, readWrite in readWrite ? ETXTBSY : 0 })
        #expect(busy.hint != MemoryBackendExplanation.readOnlyFileHint)
        // Writable: QEMU opens it; the hint is about the combination, not the file.
        let writable = MemoryBackendExplanation.explain(.writableClone, file: "/t/memory", access: { _, _ in 0 })
        #expect(writable.file?.wouldOpen == true)
        #expect(writable.hint?.contains("opened read-write although guest writes never reach it") == true)
    }

    @Test("a refused combination never opens: would_open is false, the hint fixes the options")
    func refusedWithFile() {
        let explanation = MemoryBackendExplanation.explain(MemoryBackendOptions(share: true, readonly: true, rom: .off), file: "/t/memory", access: { _, _ in 0 })
        #expect(explanation.file == MemoryBackendExplanation.FileCheck(path: "/t/memory", exists: true, readable: true, writable: true, wouldOpen: false))
        #expect(explanation.hint?.contains("share=off,readonly=on,rom=off") == true)
        #expect(explanation.lines.last == "  file:        /t/memory: readable, writable by this user")
    }

    @Test("a missing file or a directory is named in the hint")
    func missingOrDirectory() {
        let missingClone = MemoryBackendExplanation.explain(.clone, file: "/t/nope", access: { _, _ in ENOENT })
        #expect(missingClone.file?.exists == false)
        #expect(missingClone.hint?.contains("does not create a file for readonly=on") == true)
        #expect(missingClone.lines.last == "  file:        /t/nope: does not exist; QEMU could not open it read-only")
        let missingWritable = MemoryBackendExplanation.explain(.writableClone, file: "/t/nope", access: { _, _ in ENOTDIR })
        #expect(missingWritable.file?.exists == false)
        #expect(missingWritable.hint?.contains("QEMU would create a new, empty file") == true)
        let directory = MemoryBackendExplanation.explain(.clone, file: "/t", access: { _, _ in EISDIR })
        #expect(directory.file?.exists == true)
        #expect(directory.file?.wouldOpen == false)
        #expect(directory.hint == "/t is a directory: give the memory file itself")
    }

    // MARK: Real files

    @Test("a real 0444 file: root may write it, others may not; the check changes nothing")
    func realReadOnlyFile() throws {
        let directory = NSTemporaryDirectory() + "vmt-explain-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/memory"
        let content = Data("template memory".utf8)
        #expect(FileManager.default.createFile(atPath: path, contents: content, attributes: [.posixPermissions: 0o444]))
        let before = try FileManager.default.attributesOfItem(atPath: path)

        let explanation = MemoryBackendExplanation.explain(.writableClone, file: path)
        let check = try #require(explanation.file)
        #expect(check.exists)
        #expect(check.readable)
        if getuid() == 0 || geteuid() == 0 {
            #expect(check.writable, "root opens a 0444 file read-write")
            #expect(check.wouldOpen)
            #expect(explanation.hint != MemoryBackendExplanation.readOnlyFileHint)
        } else {
            #expect(!check.writable)
            #expect(!check.wouldOpen)
            #expect(explanation.hint == MemoryBackendExplanation.readOnlyFileHint)
        }
        #expect(MemoryBackendExplanation.explain(.clone, file: path).file?.wouldOpen == true)

        let after = try FileManager.default.attributesOfItem(atPath: path)
        #expect(FileManager.default.contents(atPath: path) == content)
        #expect(after[.modificationDate] as? Date == before[.modificationDate] as? Date)
        #expect(after[.size] as? Int == before[.size] as? Int)
        #expect(after[.posixPermissions] as? Int == 0o444)
    }

    @Test("real checks of a missing path and a directory create nothing")
    func realMissingAndDirectory() throws {
        let directory = NSTemporaryDirectory() + "vmt-explain-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let missing = directory + "/memory"
        let explanation = MemoryBackendExplanation.explain(.writableClone, file: missing)
        #expect(explanation.file?.exists == false)
        #expect(!FileManager.default.fileExists(atPath: missing), "the check must never create the file")
        #expect(MemoryBackendExplanation.openCheck(path: directory, readWrite: false) == EISDIR)
        #expect(MemoryBackendExplanation.openCheck(path: directory, readWrite: true) == EISDIR)
        #expect(MemoryBackendExplanation.explain(.clone, file: directory).file?.wouldOpen == false)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    // MARK: Rendering

    @Test("the human rendering of the clone")
    func cloneLines() {
        #expect(MemoryBackendExplanation.explain(.clone).lines == [
            "QEMU accepts share=off,readonly=on,rom=off",
            "  open:        read-only (O_RDONLY)",
            "  mapping:     private (MAP_PRIVATE)",
            "  guest sees:  RAM; writes are private copy-on-write pages, never reach the file",
            "  typical use: VM templating clone (QEMU >= 8.2): the template file is never modified and clones share its unwritten pages",
        ])
    }

    @Test("the human rendering of a refusal")
    func refusalLines() {
        #expect(MemoryBackendExplanation.explain(MemoryBackendOptions(share: false, readonly: false, rom: .on)).lines == [
            "QEMU refuses share=off,readonly=off,rom=on: property 'rom' = 'on' is not supported with 'readonly' = 'off'",
            "  hint:        ROM needs the file opened read-only: add readonly=on for ROM, or use rom=off (or no rom) for RAM",
        ])
    }
}

@Suite("docs/vm-templating.md's table")
struct TemplatingTableTests {
    @Test("each of the twelve rows says what explain --json says: accepted or QEMU's error, open mode, mapping, what the guest sees, whether writes reach the file")
    func tableMatchesExplain() throws {
        let text = try String(contentsOfFile: "\(Checkout.root)/docs/vm-templating.md", encoding: .utf8)
        let rows = text.split(separator: "\n").map { $0.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) } }
            .filter { $0.count >= 10 && ["on", "off"].contains($0[1]) && ["on", "off"].contains($0[2]) && ["on", "off", "auto"].contains($0[3]) }
        #expect(Set(rows.map { "\($0[1]),\($0[2]),\($0[3])" }).count == 12, "the table has all twelve combinations once")
        for row in rows {
            let options = "share=\(row[1]),readonly=\(row[2]),rom=\(row[3])"
            let result = try CLI.run(["explain", options, "--json"])
            let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(options): \(result.stdout)")
            if object["valid"] as? Bool == true {
                #expect(row[4] == "accepted", "\(options)")
                #expect(row[5].hasPrefix(object["open_mode"] as? String ?? "?"), "\(options): open mode \(row[5])")
                #expect(row[6].hasPrefix(object["mapping"] as? String ?? "?"), "\(options): mapping \(row[6])")
                #expect(row[7].lowercased() == (object["guest_sees"] as? String ?? "?"), "\(options): guest sees \(row[7])")
                #expect(row[8].hasPrefix((object["writes_reach_file"] as? Bool) == true ? "**yes**" : "no"), "\(options): writes \(row[8])")
            } else {
                #expect(result.status == 2)
                let error = object["error"] as? String ?? ""
                #expect(row[4].hasPrefix("`") && error.contains(row[4].trimmingCharacters(in: CharacterSet(charactersIn: "`"))), "\(options): the table says \(row[4]), explain says \(error)")
            }
        }
    }
}
